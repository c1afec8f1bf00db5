"""From a GenerateRequest to an admitted request: its sampling parameters, its prompt ids, the
checks that refuse what could never be served, the content monitor's watch.

A text prompt (or chat) of over INLINE_CHARS characters is tokenized on a thread, so that a
megabytes-long prompt does not stall every other stream for seconds; its request waits here
meanwhile (its id is in use, an abort or the server's stop ends it). And no prompt is tokenized
much past what the context could hold (bounded_encode): a 15 MB text costs a few KB of work.
"""

import zmq

from semipd.services.controller.helper_thread import HelperThread
from semipd.services.controller.prompts import chat_prompt
from semipd.services.controller.request_book import RequestBook
from semipd.services.controller.requests import Request
from semipd.services.controller.resident import ResidentMemory
from semipd.shared import protocol
from semipd.shared.admission import check_request
from semipd.shared.errors import UserError
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.tokenizer import ByteTokenizer

INLINE_CHARS = 8192        # tokenized on the loop below this: a few ms
CHARS_PER_TOKEN = 16       # first window of a long text: its chars per token of context
WHITESPACE_LOOKBACK = 1024  # a window ends at the last whitespace this close to its end


def bounded_encode(tokenizer, text: str, limit: int) -> list[int] | None:
    """The text's ids; None if it certainly has more than limit tokens, decided cheaply.

    The byte tokenizer makes one token per UTF-8 byte: exact, no tokenizing. A model's own
    tokenizer has no bound by characters (a word-level or WordPiece vocabulary makes one unknown
    token of a word of any length), so growing prefixes are tokenized, each cut at whitespace
    where there is some: a prefix of more than twice `limit` tokens proves the whole has more
    than `limit`. Cutting changes only the piece it cuts (pre-tokenizers split at whitespace,
    and vocabularies are local), which would have to gain over `limit` tokens by the cut."""
    if isinstance(tokenizer, ByteTokenizer):
        return None if len(text) > limit or len(text.encode()) > limit else tokenizer.encode(text)
    end = CHARS_PER_TOKEN * (limit + 1)
    while end < len(text):
        space = max(text.rfind(c, end - WHITESPACE_LOOKBACK, end) for c in " \n\t")
        if len(tokenizer.encode(text[:space if space > 0 else end])) > 2 * limit:
            return None
        end *= 4
    return tokenizer.encode(text)


class Intake:
    def __init__(self, ctx: zmq.Context, memory: ResidentMemory, book: RequestBook, send_client):
        self.memory, self.book, self.send_client = memory, book, send_client
        self.thread = HelperThread(ctx, "semipd-tokenizer", self._tokenize)
        # On the thread: True, False once aborted, None once its client is gone.
        self.waiting: dict[tuple[bytes, str], bool | None] = {}

    def in_use(self, client: bytes, request_id: str) -> bool:
        return (client, request_id) in self.waiting or self.book.in_use(client, request_id)

    def generate(self, client: bytes, msg: protocol.GenerateRequest) -> None:
        if self.in_use(client, msg.request_id):  # not a Final: that id's stream is live
            return self.send_client(client, protocol.Reply(
                msg.request_id, False, error=f"request id {msg.request_id!r} is already in use"))
        try:
            params = SamplingParams(**msg.params)
        except TypeError as e:
            return self._reject(client, msg, f"bad sampling parameters: {e}")
        job = (client, msg, params)
        size = len(msg.prompt or "") + sum(len(str(m.get("content", ""))) for m in msg.messages or ()
                                           if isinstance(m, dict))
        if size <= INLINE_CHARS:
            return self._admit(*self._tokenize([[job]])[0])
        self.waiting[(client, msg.request_id)] = True
        self.thread.put([job])

    def abort(self, client: bytes, request_id: str) -> bool:
        """End a request still being tokenized (its abort Final goes out then); False if none is."""
        if not self.waiting.get((client, request_id)):
            return False
        self.waiting[(client, request_id)] = False
        return True

    def forget(self, client: bytes) -> None:
        """The client is gone: its requests on the thread end without a Final."""
        for key in [k for k in self.waiting if k[0] == client]:
            self.waiting[key] = None

    def on_tokenized(self, answers: list) -> None:
        for client, msg, result in answers:
            state = self.waiting.pop((client, msg.request_id))
            if state:
                self._admit(client, msg, result)
            elif state is False:
                self.send_client(client, protocol.Final(msg.request_id, "abort"))

    def close(self) -> None:
        """The server stops: requests still being tokenized end with their Final too."""
        self.thread.close()
        for (client, request_id), state in self.waiting.items():
            if state is not None:
                self.send_client(client, protocol.Final(request_id, "error", error="the server is shutting down",
                                                        error_kind="unavailable"))

    def _reject(self, client: bytes, msg: protocol.GenerateRequest, error: str, kind: str = "invalid") -> None:
        self.send_client(client, protocol.Final(msg.request_id, "error", error=error, error_kind=kind))

    def _tokenize(self, batches: list[list]) -> list:
        """(client, msg, (prompt ids, params) or the error) for each job: on the thread, or inline."""
        return [(client, msg, self._prompt(msg, params)) for b in batches for client, msg, params in b]

    def _prompt(self, msg: protocol.GenerateRequest, params: SamplingParams):
        mem = self.memory
        try:
            if msg.messages is not None:
                prompt_ids, params = chat_prompt(mem, msg, params)
            elif (msg.prompt is None) == (msg.prompt_ids is None):
                raise UserError("give exactly one of prompt, prompt_ids and messages")
            elif msg.prompt is None:
                prompt_ids = msg.prompt_ids
            else:
                params.validate(mem.model_config.vocab_size)  # max_tokens is an int from here on
                prompt_ids = bounded_encode(mem.tokenizer, msg.prompt, mem.max_model_len)
                if prompt_ids is None:
                    raise UserError(f"prompt (more than {mem.max_model_len} tokens) + max_tokens "
                                    f"({params.max_tokens}) exceeds the context length {mem.max_model_len}")
            check_request(prompt_ids, params, mem.model_config.vocab_size, mem.max_model_len,
                          mem.config.page_size, mem.num_pages)
        except UserError as e:
            return str(e)
        return prompt_ids, params

    def _admit(self, client: bytes, msg: protocol.GenerateRequest, result) -> None:
        if isinstance(result, str):
            return self._reject(client, msg, result)
        prompt_ids, params = result
        moderation = self.book.moderation
        if msg.moderate and moderation is None:
            return self._reject(client, msg, "this server has no content monitor (start it with --scm ADDR)")
        req = Request(client, msg.request_id, self.book.next_seq_id(), prompt_ids, params, params.resolved_seed())
        error = moderation and moderation.open(req, msg.prompt, msg.moderate)
        if error:  # its content monitor is away
            return self._reject(client, msg, error, "unavailable")
        self.book.admit(req)
