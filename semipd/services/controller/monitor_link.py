"""The controller's connection to the streaming content monitor (`semipd scm`): the socket, the
handshake, and the one ScmBatch per turn of the controller's loop that carries every new stream,
all new output and all closes.

The handshake: ScmHello every HELLO_EVERY_S until a monitor answers ScmReady, and anew on every
new connection, so a monitor restarted with another tokenizer is never sent the wrong kind of
input. When the monitor's tokenizer is the served model's (their fingerprints match), output
goes as token ids; otherwise as the text deltas the client gets, which the monitor re-tokenizes.
"""

import os
import socket
import sys

import zmq
from zmq.utils.monitor import recv_monitor_message

from semipd.shared import protocol

HELLO_EVERY_S = 0.5
CLOSE_LINGER_MS = 1000  # on shutdown, time for the last closes to reach the monitor


class MonitorLink:
    def __init__(self, ctx: zmq.Context, address: str, tokenizer, name: str):
        self.address, self.tokenizer = address, tokenizer
        self.sock = ctx.socket(zmq.DEALER)
        # The monitor keeps streams per peer identity and drops a peer's streams at its hello.
        # ZeroMQ would give each connection a new one, so a reconnect or a restart of this server
        # (name: its address, on this host) would leave its old streams held in the monitor.
        self.sock.setsockopt(zmq.IDENTITY, f"semipd-controller {socket.gethostname()} {name}".encode()[:255])
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # no connection: send fails at once, nothing queues
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.sock.connect(address)
        # Connection events: a monitor that went away or came back needs a fresh handshake.
        self.events = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.ready = False
        self.same_tokenizer = False
        self._batch, self._appends = protocol.ScmBatch(), {}
        self._last_hello = -HELLO_EVERY_S

    def disconnected(self) -> bool:
        """Read the connection events; True if the monitor that had answered went away. A new
        connection needs a new handshake: whoever listens now must answer a hello."""
        lost = False
        while self.events.poll(0):
            if recv_monitor_message(self.events)["event"] == zmq.EVENT_DISCONNECTED and self.ready:
                lost = True
            self.ready = False
        return lost

    def receive(self) -> list:
        """The monitor's messages for the moderation to act on (ScmScored); the handshake's
        answer and complaints are handled here."""
        out = []
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                msg = protocol.decode(data)
            except protocol.ProtocolError as e:
                warn(f"unreadable message from the content monitor: {e}")
                continue
            if isinstance(msg, protocol.ScmReady):
                same = msg.tokenizer == self.tokenizer.fingerprint()
                if not self.ready:
                    warn(f"content monitor at {self.address} connected (threshold {msg.threshold}, "
                         f"k {msg.k}, sending {'token ids' if same else 'text'})")
                self.ready, self.same_tokenizer = True, same
            elif isinstance(msg, protocol.Reply) and not msg.ok:
                warn(f"the content monitor could not read a message: {msg.error}")
            else:
                out.append(msg)

    def hello(self, now: float) -> None:
        """Not connected: say hello, every HELLO_EVERY_S."""
        if now - self._last_hello >= HELLO_EVERY_S:
            self._last_hello = now
            self._try_send(protocol.encode(protocol.ScmHello(os.getpid())))

    # ---- the batch of this turn -----------------------------------------------------------

    def open(self, stream_id: int, prompt: str | None, prompt_ids: list[int] | None) -> None:
        self._batch.opens.append(protocol.ScmOpen(stream_id, prompt, prompt_ids))

    def append(self, stream_id: int, upto: int, text: str, token_ids: list[int], last: bool) -> None:
        """More output of a stream: token ids where the monitor reads them, else text."""
        append = self._appends.get(stream_id)
        if append is None:
            append = self._appends[stream_id] = protocol.ScmAppend(stream_id, 0)
            self._batch.appends.append(append)
        append.upto, append.last = upto, last
        if token_ids is not None:
            append.token_ids += token_ids
        else:
            append.text += text

    def close_stream(self, stream_id: int) -> None:
        self._batch.closes.append(stream_id)

    def send(self) -> bool:
        """Send the turn's batch; False if the monitor is not reachable."""
        b = self._batch
        if not (b.opens or b.appends or b.closes):
            return True
        self._batch, self._appends = protocol.ScmBatch(), {}
        return all(self._try_send(data) for data in b.encoded())

    def lost(self) -> None:
        """The monitor is gone: what it was to be sent is moot; say hello at once."""
        self.ready = False
        self._batch, self._appends, self._last_hello = protocol.ScmBatch(), {}, -HELLO_EVERY_S

    def close(self) -> None:
        """Send what is left (best effort: a restart's hello drops the streams too) and close."""
        for data in self._batch.encoded() if self.ready else ():
            self._try_send(data)
        self.sock.disable_monitor()
        self.events.close(linger=0)
        self.sock.close(linger=CLOSE_LINGER_MS)

    def _try_send(self, data: bytes) -> bool:
        try:
            self.sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False


def warn(text: str) -> None:
    print(f"semipd: {text}", file=sys.stderr, flush=True)
