"""The controller: front door for clients and hub for the workers.

Clients talk to a ROUTER at the public address; workers to a second ROUTER at a private ipc://
address. Every hand-off passes through here (prefill -> controller -> decode), so the controller
always knows which worker holds each sequence: that is what lets it abort, reclaim pages and
resume requests when a worker dies. Each request ends with exactly one Final.
"""

import sys
import time
from dataclasses import replace

import zmq

from semipd.services.controller.intake import Intake
from semipd.services.controller.lifecycle import CURRENT, WorkerState
from semipd.services.controller.moderation import Moderation, ModerationConfig
from semipd.services.controller.modes import DEFAULT_DECODE_SM, DEFAULT_PREFILL_SM, ServingMode
from semipd.services.controller.partition_control import PartitionControl
from semipd.services.controller.request_book import RequestBook
from semipd.services.controller.resident import ResidentMemory
from semipd.services.controller.stopping import Stop
from semipd.services.controller.supervisor import FROZEN_S, Supervisor
from semipd.services.controller.switcher import Switcher
from semipd.shared import protocol
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.sockets import MAX_UNREAD, bind_router

POLL_MS = 50
CLOSE_LINGER_MS = 1000         # on shutdown, most time for the last Finals to reach their clients


class Controller:
    def __init__(self, config: EngineConfig, address: str, worker_address: str,
                 moderation: ModerationConfig | None = None, mode: ServingMode | None = None,
                 stop: Stop | None = None):
        self.mode = mode or ServingMode({"prefill": DEFAULT_PREFILL_SM, "decode": DEFAULT_DECODE_SM})
        self.prefill_role = "unified" if self.mode.unified else "prefill"  # where requests start
        self.memory = ResidentMemory(config)
        inits = [self.memory.worker_init(rank) for rank in range(config.tp_size)]
        self.address = address
        self.ctx = zmq.Context()
        try:
            self.front = bind_router(self.ctx, address)
            self.back = bind_router(self.ctx, worker_address, protocol.MAX_WORKER_MESSAGE_BYTES, max_unread=0)
        except zmq.ZMQError as e:
            self.ctx.destroy()
            self.memory.close()
            raise UserError(f"cannot bind {address}: {e}") from None
        self.supervisor = Supervisor(worker_address, self._send_worker,
                                     lambda sm, rank: replace(inits[rank], sm_percent=sm), self.mode.shares,
                                     config.tp_size)
        allocator = self.memory.allocator  # the loop never waits on a frozen worker for ever
        allocator.stuck_after_s, allocator.on_stuck = FROZEN_S, self.supervisor.kill_frozen
        self.switcher = Switcher(self.supervisor, self._alive,
                                 self.memory.allocator.free_owner, self.mode.switch_timeout_s)
        self.split = PartitionControl(self.mode, self.supervisor, self.switcher)
        self.book = RequestBook(self.ctx, self.memory, self.supervisor, self.split, self._send_client,
                                self.prefill_role)
        self.moderation = self.book.moderation = moderation and Moderation(
            moderation, self.ctx, self.memory.tokenizer, self._send_client, self.book.abort, address)
        self.intake = Intake(self.ctx, self.memory, self.book, self._send_client)
        self.started = time.monotonic()
        self.stop = stop or Stop()  # its ask() is the signal handler: the loop ends when stop.due()

    def _alive(self, seq_id: int) -> bool:
        """Whether a request still wants this sequence (the switcher asks in a hand-over)."""
        return seq_id in self.book.by_seq

    # ---- sending ------------------------------------------------------------------------

    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self.back.send_multipart([identity, protocol.encode(msg)])
        except zmq.ZMQError:  # the worker is gone; the supervisor will notice and recover
            pass

    def _send_client(self, client: bytes, msg) -> None:
        try:
            self.front.send_multipart([client, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the client disconnected, or stopped reading: nobody reads its requests
            if isinstance(e, zmq.Again):
                print(f"semipd: a client left {MAX_UNREAD} messages unread; its requests are ended",
                      file=sys.stderr, flush=True)
            for req in [r for r in self.book.requests.values() if r.client == client]:
                self.book.abort(req, None)
            self.intake.forget(client)

    # ---- clients ------------------------------------------------------------------------

    def on_client(self, client: bytes, data: bytes) -> None:
        try:
            msg = protocol.decode(data)
        except protocol.ProtocolError as e:
            name, request_id = protocol.peek(data)
            if name == "GenerateRequest" and request_id and (client, request_id) not in self.book.requests:
                final = protocol.Final(request_id, "error", error=str(e), error_kind="invalid")
                return self._send_client(client, final)
            return self._send_client(client, protocol.Reply(request_id, False, error=str(e)))
        if isinstance(msg, protocol.GenerateRequest) and self.stop.draining:
            self._send_client(client, protocol.Final(msg.request_id, "error", error_kind="unavailable",
                                                     error="the server is stopping: it admits no new requests"))
        elif isinstance(msg, protocol.GenerateRequest):
            self.intake.generate(client, msg)
        elif isinstance(msg, protocol.AbortRequest):
            req = self.book.requests.get((client, msg.request_id))
            if req is not None and req.where is not None:  # else its worker has finished it
                self.book.abort(req, req.final("abort"), rest=True)
            elif req is None:
                self.intake.abort(client, msg.request_id)
        elif isinstance(msg, protocol.HealthRequest):
            self._send_client(client, protocol.Reply(msg.request_id, True, self.health()))
        elif isinstance(msg, protocol.StatsRequest):
            self._send_client(client, protocol.Reply(msg.request_id, True, self.stats()))
        elif isinstance(msg, protocol.PartitionRequest):
            error = self.split.request({"prefill": msg.prefill_sm, "decode": msg.decode_sm}, "manual")
            self._send_client(client, protocol.Reply(msg.request_id, error is None,
                                                     {} if error else self.split.stats(), error))
        else:
            self._send_client(client, protocol.Reply(getattr(msg, "request_id", ""), False,
                                                     error=f"{type(msg).__name__} is not a client message"))

    # ---- workers ------------------------------------------------------------------------

    def on_worker(self, identity: bytes, data: bytes) -> None:
        msg = protocol.decode(data, protocol.MAX_WORKER_MESSAGE_BYTES)
        if isinstance(msg, protocol.WorkerHello):
            return self.supervisor.hello(identity, msg)
        worker = self.supervisor.handle_of(identity)
        if worker is None:
            return  # a dead worker's last words: its requests were already recovered
        if isinstance(msg, protocol.WorkerReady):
            if worker.state in (WorkerState.PREPARING, WorkerState.PRIMING):  # called up by a switch, or ahead
                self.switcher.on_ready(worker, msg.prepare_parts_s)
            else:
                self.supervisor.open(worker)
        elif isinstance(msg, protocol.PrefillDone):
            self.switcher.on_output(worker)
            self.on_prefill_done(msg)
        elif isinstance(msg, protocol.DecodeStep):
            self.switcher.on_output(worker)
            self.on_decode_step(msg)
            self.switcher.on_last_step(worker, msg)
        elif isinstance(msg, protocol.StepTimes):
            worker.step_times = (msg, time.monotonic())
        elif isinstance(msg, protocol.HandedOver):
            self.switcher.on_handed_over(worker, msg)
        elif isinstance(msg, protocol.Preempted):
            for state in msg.seqs:
                req = self.book.by_seq.get(state.seq_id)
                if req is not None:
                    self.book.resume(req)

    def on_prefill_done(self, msg: protocol.PrefillDone) -> None:
        """First tokens. Until the hand-off reaches decode, the controller holds these pages."""
        handoff = []
        for state, finished in zip(msg.seqs, msg.finished):
            req = self.book.by_seq.get(state.seq_id)
            if req is None:
                if finished is None:  # ended here (aborted, or a stop string): free its pages
                    self.memory.allocator.free_owner(state.seq_id)
                continue
            self.book.token(req, state.token_ids[-1], finished)
            if finished is None:
                req.where = "decode"
                handoff.append(state)
        if handoff:
            self.supervisor.send("decode", protocol.RunSeqs(handoff))

    def on_decode_step(self, msg: protocol.DecodeStep) -> None:
        for seq_id, token, finished in zip(msg.seq_ids, msg.tokens, msg.finished):
            req = self.book.by_seq.get(seq_id)
            if req is not None:
                self.book.token(req, token, finished)

    # ---- status -------------------------------------------------------------------------

    def health(self) -> dict:
        # During a switch the role's new worker is closed for the few ms of the handover; its
        # requests queue and the server is serving, not starting.
        serving = self.supervisor.all_ready() or bool(self.switcher.active)
        return {"status": "stopping" if self.stop.draining else "ok" if serving else "starting",
                "uptime_s": time.monotonic() - self.started, "model": self.memory.config.model,
                "scm": self.moderation and self.moderation.health()}

    def stats(self) -> dict:
        reqs = self.book.requests.values()
        return {"model": self.memory.config.model, "uptime_s": time.monotonic() - self.started,
                "served": dict(self.book.served), "prefix_cache": self.memory.allocator.cache_stats(),
                "kv_pages_total": self.memory.num_pages, "kv_pages_free": self.memory.allocator.num_free(),
                "running": sum(bool(r.output_ids) for r in reqs), "waiting": sum(not r.output_ids for r in reqs),
                "workers": {role: {**self.supervisor.stats(role), "switch": self.switcher.stats(role)}
                            for role in self.supervisor.workers},
                "partition": self.split.stats(),
                "worker_restarts": self.supervisor.restarts, "page_size": self.memory.config.page_size,
                "max_model_len": self.memory.max_model_len,
                "scm": self.moderation and self.moderation.stats()}

    def status(self) -> str:
        """One line for the service manager (systemd's STATUS=, `systemctl status`)."""
        if self.health()["status"] != "ok":
            return "starting workers"
        stats = self.stats()
        split = stats["partition"]
        shares = "unified" if split["mode"] == "unified" else f"split {split['prefill_sm']}/{split['decode_sm']}"
        return f"serving: {stats['running']} running, {stats['waiting']} waiting, {shares}"

    # ---- loop ---------------------------------------------------------------------------

    def serve_forever(self, on_ready=None, on_turn=None) -> None:
        """Serve until self.stop says it is time. on_ready: called once every worker serves;
        on_turn: at the end of every turn of the loop (systemd's watchdog: a loop that stops
        turning stops pinging)."""
        self.supervisor.start_all()
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.book.detok.sock, zmq.POLLIN)
        poller.register(self.intake.thread.sock, zmq.POLLIN)
        if self.moderation is not None:
            poller.register(self.moderation.link.sock, zmq.POLLIN)
        announced = False
        while not self.stop.due(self.in_flight()):
            self.book.detok.submit()  # what the last turn handed it
            events = dict(poller.poll(POLL_MS))
            if self.book.detok.sock in events:
                self.book.on_text(self.book.detok.answers())
            if self.intake.thread.sock in events:
                self.intake.on_tokenized(self.intake.thread.answers())
            if self.back in events:
                self._drain(self.back, self.on_worker)
            if self.front in events:
                self._drain(self.front, self.on_client)
            now = time.monotonic()
            self.switcher.check_timeouts(now)
            self.split.tick(self.book.requests.values(), now)
            deaths = self.supervisor.dead()
            for was, worker in deaths:
                if self.switcher.on_death(was, worker):
                    self.book.recover(worker.role)
                # A switch that a death ends settles through Switcher.on_end. A current worker's
                # death starts a new window too (its latencies are not the split's); a standby's,
                # a primed or a retiring worker's does not: they serve none of the split.
                if was in CURRENT:
                    self.split.settle()
            if deaths:
                self.book.free_held_back()
            if self.moderation is not None:
                self.moderation.tick()
            if not announced and self.supervisor.all_ready():
                announced = True
                print(f"semipd: serving {self.memory.config.model} at {self.address}", file=sys.stderr, flush=True)
                self.split.serving()
                if on_ready:
                    on_ready()
            if on_turn:
                on_turn()

    def in_flight(self) -> int:
        """Requests whose Final has not gone out: being tokenized, served, or waiting for their
        last text or the monitor's last scores."""
        held = self.moderation and sum(w.final is not None for w in self.moderation.watches.values())
        return len(self.intake.waiting) + len(self.book.requests) + len(self.book.ending) + (held or 0)

    def _drain(self, sock: zmq.Socket, handle) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2:
                handle(frames[0], frames[1])
            else:
                self._send_client(frames[0], protocol.Reply("", False, error="send one frame per message"))

    def close(self, deadline: float) -> None:
        """The stop path, by the deadline (monotonic s): every open stream's Final goes out and
        the client socket closes (its linger sends them meanwhile), then the workers and standbys
        stop together, then the rest."""
        self.intake.close()
        self.book.close()
        if self.moderation is not None:
            self.moderation.close()
        self.front.close(linger=int(min(CLOSE_LINGER_MS, 1000 * max(0.0, deadline - time.monotonic()))))
        killed = self.supervisor.stop(deadline)
        if killed:
            print(f"semipd: {killed} workers did not stop in time and were killed", file=sys.stderr, flush=True)
        self.back.close()
        self.ctx.term()
        self.memory.close()

