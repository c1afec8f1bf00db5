"""Chat requests: messages rendered to prompt ids with the model's own chat template (as
transformers' `apply_chat_template` with the generation prompt), and the template's end-of-turn
token added to the request's stop tokens, so that the model's answer ends its turn with `stop`."""

import functools
from dataclasses import dataclass, replace

from semipd.services.controller.resident import ResidentMemory
from semipd.shared import protocol
from semipd.shared.errors import UserError, first_line
from semipd.shared.sampling_params import SamplingParams

# An assistant turn with this text, rendered, shows what the template closes a turn with.
PROBE = "semipd-end-of-turn-probe"


@dataclass
class ChatTemplate:
    tokenizer: object           # transformers' tokenizer, which renders the template
    stop_ids: list[int]         # its end-of-turn token and EOS

    def render(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise UserError("messages is empty")
        for m in messages:
            if set(m) != {"role", "content"} or not all(isinstance(v, str) for v in m.values()):
                raise UserError(f"a chat message is {{\"role\": str, \"content\": str}}, got {m!r}")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own raise_exception, or any Jinja error
            raise UserError(f"the model's chat template refused these messages: {first_line(e)}") from None
        # The template writes BOS and the like itself where the model wants them.
        return self.tokenizer.encode(text, add_special_tokens=False)


@functools.cache
def chat_template(tokenizer) -> ChatTemplate:
    """The chat template of the server's tokenizer (semipd.shared.tokenizer): HFTokenizer keeps
    transformers' tokenizer as _tok; the presets' ByteTokenizer has no template."""
    hf = getattr(tokenizer, "_tok", None)
    if getattr(hf, "chat_template", None) is None:
        raise UserError("this model has no chat template: send a prompt instead of messages")
    stop = {hf.eos_token_id, _end_of_turn(hf)} - {None}
    return ChatTemplate(hf, sorted(stop))


def _end_of_turn(hf) -> int | None:
    """The special token a rendered assistant turn ends with (<|im_end|>, <|eot_id|>, ...)."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = hf.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that will not render this chat: EOS alone ends a turn
        return None
    _, found, after = text.rpartition(PROBE)
    special = {i for i, token in hf.added_tokens_decoder.items() if token.special}
    return next((i for i in hf.encode(after, add_special_tokens=False) if i in special), None) if found else None


def chat_prompt(memory: ResidentMemory, msg: protocol.GenerateRequest,
                params: SamplingParams) -> tuple[list[int], SamplingParams]:
    """The prompt ids of msg's messages and the params to sample its answer with: the template's
    stop tokens added (unless ignore_eos), and without max_tokens, the room left in the context."""
    if msg.prompt is not None or msg.prompt_ids is not None:
        raise UserError("give exactly one of prompt, prompt_ids and messages")
    template = chat_template(memory.tokenizer)
    ids = template.render(msg.messages)
    params.validate(memory.model_config.vocab_size)  # stop_token_ids is a list from here on
    changes = {"stop_token_ids": params.stop_token_ids + ([] if params.ignore_eos else template.stop_ids)}
    if "max_tokens" not in msg.params:  # as OpenAI's chat: answer until the context is full
        room = min(memory.max_model_len, memory.num_pages * memory.config.page_size) - len(ids)
        changes["max_tokens"] = max(room, 1)
    return ids, replace(params, **changes)
