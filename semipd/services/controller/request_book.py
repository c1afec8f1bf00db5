"""Every request the controller serves, from admission to its one Final: where its sequence
is, its text (made on the detokenizer thread), how it ends, and the pages to reclaim when a worker
dies. The controller routes messages; what they do to a request happens here."""

import itertools

import zmq

from semipd.services.controller.detokenizer import DetokenizerThread, End
from semipd.services.controller.moderation import Moderation
from semipd.services.controller.partition_control import PartitionControl
from semipd.services.controller.requests import Request
from semipd.services.controller.resident import ResidentMemory
from semipd.services.controller.supervisor import Supervisor
from semipd.shared import protocol
from semipd.shared.page_allocator import releaser

# A request that kills workers cannot loop: a third crash under it ends it with an error. Two are
# forgiven because the two workers of a switch can die together, and a request recovered from the
# old one may reach the new one before that one's death is noticed.
MAX_RESTARTS_PER_REQUEST = 2
# Dropped sequences remembered per role before those already freed are forgotten (after which
# only the few whose AbortSeqs is still on its way remain).
PRUNE_DROPPED = 1024


class RequestBook:
    def __init__(self, ctx: zmq.Context, memory: ResidentMemory, supervisor: Supervisor,
                 split: PartitionControl, send_client, prefill_role: str):
        self.memory, self.supervisor, self.split = memory, supervisor, split
        self.send_client, self.prefill_role = send_client, prefill_role
        self.moderation: Moderation | None = None   # set once the controller has made it
        self.requests: dict[tuple[bytes, str], Request] = {}
        self.by_seq: dict[int, Request] = {}
        self.detok = DetokenizerThread(ctx, memory.tokenizer)
        # Ended here, their Finals waiting for the rest of their text from the detokenizer thread.
        self.ending: dict[int, tuple[Request, protocol.Final]] = {}
        # Sequences ended here that a worker of the role may still hold (its AbortSeqs unread):
        # if the worker dies first, nothing else would free their pages.
        self.dropped: dict[str, set[int]] = {}
        # What the requests that ended had (served or not): `semipd stats` shows it.
        self.served = {"requests": 0, "prompt_tokens": 0, "output_tokens": 0}
        self._seq_ids = itertools.count()

    def next_seq_id(self) -> int:
        return next(self._seq_ids)

    def in_use(self, client: bytes, request_id: str) -> bool:
        """A live stream, or one whose Final waits for its text, has this id."""
        return (client, request_id) in self.requests or any(
            r.client == client and r.request_id == request_id for r, _ in self.ending.values())

    def admit(self, req: Request) -> None:
        """Start serving an accepted request: its sequence goes to prefill (or unified)."""
        req.where = self.prefill_role
        self.split.arrived(req)
        self.requests[(req.client, req.request_id)] = req
        self.by_seq[req.seq_id] = req
        self.detok.open(req.seq_id, req.params.stop)
        self.supervisor.send(self.prefill_role, protocol.RunSeqs([req.state()]))

    def resume(self, req: Request) -> None:
        """Recompute a request through prefill (its pages freed: preempted, or its worker died)."""
        req.where = self.prefill_role
        self.supervisor.send(self.prefill_role, protocol.RunSeqs([req.state()]))

    def close(self) -> None:
        """The server stops: every open stream ends with one Final, now too."""
        for req in list(self.requests.values()):
            self.finish(req, req.final("error", error="the server is shutting down", error_kind="unavailable"),
                        rest=True)
        self.on_text(self.detok.close())  # the last deltas, and the Finals

    def finish(self, req: Request, final: protocol.Final | None, rest: bool = False) -> None:
        """End a request once: forget it and send its Final (None: the client is gone). rest:
        the text not yet shown goes out first, as a last Delta, after the deltas the detokenizer
        thread is still making; else its text is dropped."""
        if self.requests.pop((req.client, req.request_id), None) is None:
            return
        del self.by_seq[req.seq_id]
        self.served["requests"] += 1
        self.served["prompt_tokens"] += len(req.prompt_ids)
        self.served["output_tokens"] += len(req.output_ids)
        if final is not None:
            self.split.finished(req, final)
        rest = rest and final is not None
        self.detok.end(req.seq_id, rest)
        if rest:
            self.ending[req.seq_id] = (req, final)
        else:
            self._send_final(req, final)

    def _send_final(self, req: Request, final: protocol.Final | None) -> None:
        if self.moderation is not None:  # None: the Final waits for the monitor's last scores
            final = self.moderation.finish(req, final)
        if final is not None:
            self.send_client(req.client, final)

    def abort(self, req: Request, final: protocol.Final | None, rest: bool = False) -> None:
        """End a request that a worker may still hold."""
        self.drop(req)
        self.finish(req, final, rest)

    def drop(self, req: Request) -> None:
        """The worker holding the sequence drops it and frees its pages (a no-op if it already
        left: see on_prefill_done); should the worker die first, recover() frees them."""
        if req.where is None:  # its worker has finished it
            return
        self.supervisor.send(req.where, protocol.AbortSeqs([req.seq_id]))
        dropped = self.dropped.setdefault(req.where, set())
        dropped.add(req.seq_id)
        if len(dropped) > PRUNE_DROPPED:  # keep those still holding pages
            dropped.intersection_update(self.memory.allocator.owners())

    def token(self, req: Request, token: int, finished: str | None) -> None:
        """Record one new token and hand it to the detokenizer thread (on_text streams it)."""
        self.detok.token(req.seq_id, req.add_token(token), token, finished)
        if finished is not None:
            req.where = None

    def on_text(self, pieces: list) -> None:
        """The detokenizer thread's answers: stream the text, end requests whose worker finished
        them or whose text reached a stop string, send Finals that waited for their text."""
        for piece in pieces:
            if isinstance(piece, End):
                req, final = self.ending.pop(piece.seq_id)
                if piece.text:  # held back by a stop string that never came
                    self._stream(req, piece.text, [])
                self._send_final(req, final)
                continue
            req = self.by_seq.get(piece.seq_id)
            if req is None:
                ended = self.ending.get(piece.seq_id)
                if ended is not None:  # ended here: the deltas made before go out before its Final
                    self._stream(ended[0], piece.text, [piece.token])
                continue
            if piece.stopped:  # a worker may hold it still (decode, if found after the hand-off)
                req.cut(piece.index)
                self.drop(req)
            # The last token's text is a Delta too, so that a stream's deltas add up to its text.
            self._stream(req, piece.text, [piece.token])
            if piece.stopped or piece.finished is not None:
                self.finish(req, req.final("stop" if piece.stopped else piece.finished))

    def _stream(self, req: Request, text: str, token_ids: list[int]) -> None:
        delta = protocol.Delta(req.request_id, text, token_ids)
        if self.moderation is None or not self.moderation.hold(req, delta):
            self.send_client(req.client, delta)

    def recover(self, role: str) -> None:
        """A worker died: reclaim the pages of everything it held and resume it through prefill
        (recomputing the K/V), or end it with an error if it has already survived a crash."""
        for seq_id in self.dropped.pop(role, ()):  # ended here, perhaps never dropped there
            self.memory.allocator.free_owner(seq_id)
        for req in [r for r in self.requests.values() if r.where == role]:
            self.memory.allocator.free_owner(req.seq_id)
            req.restarts += 1
            if req.restarts > MAX_RESTARTS_PER_REQUEST:
                error = f"workers died under it {req.restarts} times, the last the {role} worker"
                self.finish(req, req.final("error", error=error, error_kind="internal"), rest=True)
                continue
            self.resume(req)

    def free_held_back(self) -> None:
        """Free the pages that workers now dead (or killed in their wake) held back for a step
        in flight: their requests had ended. A live worker's are its own to free."""
        live = self.supervisor.live_pids()
        for owner in self.memory.allocator.owners():
            if (pid := releaser(owner)) is not None and pid not in live:
                self.memory.allocator.free_owner(owner)
