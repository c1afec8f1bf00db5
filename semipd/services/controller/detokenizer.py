"""Detokenization off the controller's loop: a thread of the controller process owns every
request's Detokenizer.

The loop (supervision, routing, moderation, the partitioner) then does no tokenizer work per
token: it records each token, hands it in and goes on. Per turn it hands in one batch, in the
order it learnt of them: a new request's stop strings (Open), each new token with the worker's
finish reason (Token), the end of a request's text (End). The thread answers with the same
pieces, their text filled in, in the same order, so every request's deltas come back in order
and before its end. Python objects pass through queues (nothing to serialize); an inproc PAIR
socket only wakes the loop's poller. The thread takes every batch waiting and answers them
with one wake-up, so under load it holds the GIL in few longer stretches, not once per token.
"""

import collections
import itertools
import queue
import threading
import traceback
from dataclasses import dataclass

import zmq

from semipd.shared.tokenizer import Detokenizer

_names = itertools.count()


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
    shown if rest (an abort's Final carries it)."""
    seq_id: int
    rest: bool
    text: str = ""                  # answer


class DetokenizerThread:
    def __init__(self, ctx: zmq.Context, tokenizer):
        self.tokenizer = tokenizer
        self.detoks: dict[int, Detokenizer] = {}   # the thread's alone
        self._batch: list = []                     # this turn's pieces, not yet handed in
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: collections.deque = collections.deque()
        self._error: str | None = None
        address = f"inproc://semipd-detokenizer-{next(_names)}"
        self.sock = ctx.socket(zmq.PAIR)   # the loop's end: readable when answers wait
        self.sock.bind(address)
        self._thread = threading.Thread(target=self._run, args=(ctx, address),
                                        name="semipd-detokenizer", daemon=True)
        self._thread.start()

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
            self._inbox.put(self._batch)
            self._batch = []

    def answers(self) -> list:
        """The pieces answered so far, in the order they were handed in."""
        while True:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        if self._error is not None:
            raise RuntimeError(f"the detokenizer thread failed:\n{self._error}")
        return self._take()

    def close(self) -> list:
        """Stop once everything handed in is answered; returns the answers not yet read."""
        self.submit()
        self._inbox.put(None)
        self._thread.join()
        self.sock.close(linger=0)
        return self._take() if self._error is None else []

    def _take(self) -> list:
        out = []
        while self._answers:
            out += self._answers.popleft()
        return out

    # ---- the thread ---------------------------------------------------------------------

    def _run(self, ctx: zmq.Context, address: str) -> None:
        wake = ctx.socket(zmq.PAIR)
        wake.connect(address)
        try:
            while True:
                batches = [self._inbox.get()]
                while not self._inbox.empty():  # every batch waiting: one answer, one wake-up
                    batches.append(self._inbox.get())
                self._answers.append([p for b in batches if b for p in b if self._work(p)])
                _wake(wake)
                if None in batches:
                    return
        except Exception:
            self._error = traceback.format_exc()
            _wake(wake)
        finally:
            wake.close(linger=0)

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


def _wake(sock: zmq.Socket) -> None:
    try:
        sock.send(b"", zmq.NOBLOCK)
    except zmq.Again:  # wake-ups unread already: the loop reads every answer when it wakes
        pass
