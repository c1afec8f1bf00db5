"""A thread of the controller process that works off the loop and wakes the loop's poller when
its answers wait (the detokenizer and the tokenizer threads are two).

Python objects pass through queues (nothing to serialize); an inproc PAIR socket only wakes the
poller. The thread takes every batch waiting and answers them together with one wake-up, so
under load it holds the GIL in few longer stretches, not once per piece.
"""

import collections
import itertools
import queue
import threading
import traceback

import zmq

_names = itertools.count()


class HelperThread:
    def __init__(self, ctx: zmq.Context, name: str, work):
        """work(batches) -> answers: runs on the thread, given every batch waiting, in order."""
        self._work = work
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: collections.deque = collections.deque()
        self._error: str | None = None
        self.name = name
        address = f"inproc://{name}-{next(_names)}"
        self.sock = ctx.socket(zmq.PAIR)   # the loop's end: readable when answers wait
        self.sock.bind(address)
        self._thread = threading.Thread(target=self._run, args=(ctx, address), name=name, daemon=True)
        self._thread.start()

    def put(self, batch: list) -> None:
        self._inbox.put(batch)

    def answers(self) -> list:
        """The answers so far, in the order their batches were put."""
        while True:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        if self._error is not None:
            raise RuntimeError(f"the {self.name} thread failed:\n{self._error}")
        return self._take()

    def close(self) -> list:
        """Stop once everything put is answered; returns the answers not yet read."""
        self._inbox.put(None)
        self._thread.join()
        self.sock.close(linger=0)
        return self._take() if self._error is None else []

    def _take(self) -> list:
        out = []
        while self._answers:
            out += self._answers.popleft()
        return out

    def _run(self, ctx: zmq.Context, address: str) -> None:
        wake = ctx.socket(zmq.PAIR)
        wake.connect(address)
        try:
            while True:
                batches = [self._inbox.get()]
                while not self._inbox.empty():  # every batch waiting: one answer, one wake-up
                    batches.append(self._inbox.get())
                self._answers.append(self._work([b for b in batches if b]))
                _wake(wake)
                if None in batches:
                    return
        except Exception:
            self._error = traceback.format_exc()
            _wake(wake)
        finally:
            wake.close(linger=0)


def _wake(sock: zmq.Socket) -> None:
    try:
        sock.send(b"", zmq.NOBLOCK)
    except zmq.Again:  # wake-ups unread already: the loop reads every answer when it wakes
        pass
