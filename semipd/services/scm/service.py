"""`semipd scm`: the streaming content monitor as a process of its own.

Controllers connect a DEALER to its ROUTER (by default an ipc:// socket in the runtime folder;
for tcp:// give a loopback address). The loop never waits on a socket while it has work: between
steps it drains whatever messages are waiting, then one step scores the new tokens of all
streams together (monitor.StreamMonitor) and each controller gets one ScmScored for it.
With a step interval, a step starts at most once per interval (messages are drained meanwhile):
every step reads all of the monitor's weights, so on a GPU shared with the served model, fewer
and larger steps take less of its memory bandwidth.

Streams are keyed by (controller socket identity, stream id). A controller's ScmHello drops its
old streams: it has (re)connected, or given up on them after a timeout. Bad input (an unreadable
message, a stream that cannot be watched) gets an error answer; the service keeps serving.
"""

import math
import os
import signal
import sys
import time

import torch
import zmq

from semipd.services.scm.model import load_monitor
from semipd.services.scm.monitor import StreamMonitor, auto_pages
from semipd.shared import protocol
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.runtime import refuse_if_listening
from semipd.shared.sd_notify import Notifier
from semipd.shared.sockets import bind_router

IDLE_POLL_MS = 100


class ScmService:
    def __init__(self, sm: StreamMonitor, address: str, step_interval_s: float = 0.0):
        self.sm, self.step_interval_s = sm, step_interval_s
        self.ctx = zmq.Context()
        try:
            self.sock = bind_router(self.ctx, address)
            # A controller that reconnects (or restarts) keeps its identity (moderation.py):
            # its new connection takes the identity over, and its hello drops its old streams.
            self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        except zmq.ZMQError as e:
            self.ctx.destroy()
            raise UserError(f"cannot bind {address}: {e}") from None

    def serve_forever(self, on_turn=None) -> None:
        """Serve until a signal. on_turn: called on every turn of the loop (systemd's watchdog)."""
        next_step = 0.0
        while True:
            wait_ms = math.ceil(max(0.0, next_step - time.monotonic()) * 1e3) if self.sm.has_work() else IDLE_POLL_MS
            if self.sock.poll(wait_ms):
                self._drain()
            now = time.monotonic()
            if self.sm.has_work() and now >= next_step:
                next_step = now + self.step_interval_s
                self._answer(self.sm.step())
            if on_turn:
                on_turn()

    def status(self) -> str:
        """One line for the service manager (systemd's STATUS=)."""
        return f"monitoring {len(self.sm.streams)} streams"

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
        self.sm.close()

    def _drain(self) -> None:
        while True:
            try:
                peer, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 1:
                    raise protocol.ProtocolError("send one frame per message")
                msg = protocol.decode(frames[0])
            except protocol.ProtocolError as e:
                self._send(peer, protocol.Reply("", False, error=str(e)))
                continue
            if isinstance(msg, protocol.ScmHello):
                self._forget(peer)
                self._send(peer, protocol.ScmReady(self.sm.monitor.tokenizer.fingerprint(), self.sm.threshold,
                                                   self.sm.k, self.sm.max_streams))
            elif isinstance(msg, protocol.ScmBatch):
                self._on_batch(peer, msg)
            else:
                self._send(peer, protocol.Reply("", False, error=f"{type(msg).__name__} is not a monitor message"))

    def _on_batch(self, peer: bytes, batch: protocol.ScmBatch) -> None:
        refused = []
        for op in batch.opens:
            try:
                self.sm.open((peer, op.stream_id), op.prompt, op.prompt_ids)
            except ValueError as e:
                refused.append((op.stream_id, str(e)))
        for ap in batch.appends:
            try:
                self.sm.append((peer, ap.stream_id), ap.upto, ap.text, ap.token_ids, ap.last)
            except ValueError as e:
                refused.append((ap.stream_id, str(e)))
        for stream_id in batch.closes:
            self.sm.drop((peer, stream_id))
        if refused:
            self._send(peer, protocol.ScmScored([s for s, _ in refused], [0] * len(refused),
                                                [None] * len(refused), [e for _, e in refused]))

    def _answer(self, news) -> None:
        by_peer: dict[bytes, list] = {}
        for n in news:
            by_peer.setdefault(n.key[0], []).append(n)
        for peer, items in by_peer.items():
            self._send(peer, protocol.ScmScored([n.key[1] for n in items], [n.upto for n in items],
                                                [n.verdict for n in items], [n.error for n in items]))

    def _send(self, peer: bytes, msg) -> None:
        try:
            self.sock.send_multipart([peer, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the controller is gone (or stopped reading): nobody will read its scores
            self._forget(peer)

    def _forget(self, peer: bytes) -> None:
        for key in [k for k in self.sm.streams if k[0] == peer]:
            self.sm.drop(key)


def run(args) -> None:
    if not 0 < args.threshold <= 1:
        raise UserError(f"--threshold must lie in (0, 1], got {args.threshold}")
    for name in ("k", "max_streams", "max_model_len", "page_size", "max_batched_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.step_interval_ms <= 1000:
        raise UserError(f"--step-interval-ms must lie in [0, 1000], got {args.step_interval_ms}")
    refuse_if_listening(args.address)
    systemd = Notifier.from_env()  # READY, STATUS, WATCHDOG, STOPPING under a Type=notify unit
    systemd.status("loading the monitor")
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    device = config.torch_device()
    if device.type == "cpu":  # leave cores to the serving processes beside it
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    monitor = load_monitor(args.model, device, config.torch_dtype(device), progress=False)
    num_pages = args.num_pages or auto_pages(args.max_streams, args.max_model_len, args.page_size)
    sm = StreamMonitor(monitor, args.threshold, args.k, args.max_streams, num_pages, args.page_size,
                       args.max_model_len, args.max_batched_tokens)
    address = args.address
    try:
        service = ScmService(sm, address, args.step_interval_ms / 1e3)
    except UserError:
        sm.close()
        raise
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"semipd: content monitor {args.model} ready at {address} (threshold {args.threshold}, "
          f"k {args.k})", file=sys.stderr, flush=True)
    systemd.ready(service.status())
    try:
        service.serve_forever(on_turn=lambda: systemd.alive(service.status))
    except KeyboardInterrupt:
        pass
    finally:
        systemd.stopping()
        service.close()
        if address.startswith("ipc://") and os.path.exists(address[len("ipc://"):]):
            os.unlink(address[len("ipc://"):])
