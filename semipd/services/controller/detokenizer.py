"""Detokenization off the controller's loop: a thread of the controller process owns every
request's Detokenizer.

The loop (supervision, routing, moderation, the partitioner) then does no tokenizer work per
token: it records each token, hands it in and goes on. Per turn it hands in one batch, in the
order it learnt of them: a new request's stop strings (Open), each new token with the worker's
finish reason (Token), the end of a request's text (End). The thread answers with the same
pieces, their text filled in, in the same order, so every request's deltas come back in order
and before its end (helper_thread.py: how the answers wake the loop).
"""

from dataclasses import dataclass

import zmq

from semipd.services.controller.helper_thread import HelperThread
from semipd.shared.tokenizer import Detokenizer


@dataclass
class Open:
    """A new request: its stop strings."""
    seq_id: int
    stop: list[str]


@dataclass
class Token:
    """A new token; answered with its text, unless a stop string already ended the request's."""
    seq_id: int
    index: int                      # its place in the output
    token: int
    finished: str | None            # the worker's finish reason: the text ends with this token
    text: str = ""                  # answer: text to show now (all that is left, if it ended)
    stopped: bool = False           # answer: a stop string ends the text at this token


@dataclass
class End:
    """The request ended at the controller: forget its text, answering with what was not yet
    shown if rest (the last Delta before an abort's Final)."""
    seq_id: int
    rest: bool
    text: str = ""                  # answer


class DetokenizerThread:
    def __init__(self, ctx: zmq.Context, tokenizer):
        self.tokenizer = tokenizer
        self.detoks: dict[int, Detokenizer] = {}   # the thread's alone
        self._batch: list = []                     # this turn's pieces, not yet handed in
        self._helper = HelperThread(ctx, "semipd-detokenizer", self._answer)
        self.sock = self._helper.sock

    # ---- the loop's side ----------------------------------------------------------------

    def open(self, seq_id: int, stop: list[str]) -> None:
        self._batch.append(Open(seq_id, stop))

    def token(self, seq_id: int, index: int, token: int, finished: str | None) -> None:
        self._batch.append(Token(seq_id, index, token, finished))

    def end(self, seq_id: int, rest: bool) -> None:
        self._batch.append(End(seq_id, rest))

    def submit(self) -> None:
        """Hand in this turn's pieces."""
        if self._batch:
            self._helper.put(self._batch)
            self._batch = []

    def answers(self) -> list:
        """The pieces answered so far, in the order they were handed in."""
        return self._helper.answers()

    def close(self) -> list:
        """Stop once everything handed in is answered; returns the answers not yet read."""
        self.submit()
        return self._helper.close()

    # ---- the thread ---------------------------------------------------------------------

    def _answer(self, batches: list[list]) -> list:
        return [p for b in batches for p in b if self._work(p)]

    def _work(self, piece) -> bool:
        """Fill in a piece's answer; False if it has none."""
        if isinstance(piece, Open):
            self.detoks[piece.seq_id] = Detokenizer(self.tokenizer, piece.stop)
            return False
        if isinstance(piece, End):
            detok = self.detoks.pop(piece.seq_id, None)
            if piece.rest and detok is not None:
                piece.text = detok.flush()
            return piece.rest
        detok = self.detoks.get(piece.seq_id)
        if detok is None:  # a stop string ended its text
            return False
        piece.text, piece.stopped = detok.add([piece.token])
        if piece.stopped or piece.finished is not None:
            piece.text += detok.flush()
            del self.detoks[piece.seq_id]
        return True

