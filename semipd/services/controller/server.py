"""The controller: front door for clients and hub for the workers.

Clients talk to a ROUTER at the public address; workers to a second ROUTER at a private ipc://
address. Every hand-off passes through here (prefill -> controller -> decode), so the controller
always knows which worker holds each sequence: that is what lets it abort, reclaim pages and
resume requests when a worker dies. Each request ends with exactly one Final.
"""

import itertools
import json
import sys
import time
from collections import deque
from dataclasses import replace

import zmq

from semipd.services.controller.lifecycle import WorkerState
from semipd.services.controller.moderation import Moderation, ModerationConfig
from semipd.services.controller.modes import DEFAULT_DECODE_SM, DEFAULT_PREFILL_SM, ServingMode
from semipd.services.controller.partitioner import Partitioner
from semipd.services.controller.requests import Request
from semipd.services.controller.resident import ResidentMemory
from semipd.services.controller.supervisor import Supervisor
from semipd.services.controller.switcher import Switcher
from semipd.shared import protocol
from semipd.shared.admission import check_request
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.page_allocator import releaser
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sockets import MAX_UNREAD, bind_router
from semipd.shared.tokenizer import Detokenizer

POLL_MS = 50
MAX_RESTARTS_PER_REQUEST = 1   # a request that kills workers twice ends with an error
CLOSE_LINGER_MS = 1000         # on shutdown, time for the last Finals to reach their clients
# Dropped sequences remembered per role before those already freed are forgotten (after which
# only the few whose AbortSeqs is still on its way remain).
PRUNE_DROPPED = 1024
class Controller:
    def __init__(self, config: EngineConfig, address: str, worker_address: str,
                 moderation: ModerationConfig | None = None, mode: ServingMode | None = None):
        self.mode = mode or ServingMode({"prefill": DEFAULT_PREFILL_SM, "decode": DEFAULT_DECODE_SM})
        self.prefill_role = "unified" if self.mode.unified else "prefill"  # where requests start
        self.partitioner = self.mode.partition and Partitioner(self.mode.partition, **{
            f"{role}_sm": share for role, share in self.mode.shares.items()})
        self.decisions: deque[dict] = deque(maxlen=100)
        self.memory = ResidentMemory(config)
        init_msg = self.memory.worker_init()
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
                                     lambda sm: replace(init_msg, sm_percent=sm), self.mode.shares)
        self.switcher = Switcher(self.supervisor, lambda seq_id: seq_id in self.by_seq,
                                 self.memory.allocator.free_owner, self.mode.switch_timeout_s)
        self.moderation = moderation and Moderation(moderation, self.ctx, self.memory.tokenizer,
                                                    self._send_client, self._abort, address)
        self.requests: dict[tuple[bytes, str], Request] = {}
        self.by_seq: dict[int, Request] = {}
        # Sequences ended here that a worker of the role may still hold (its AbortSeqs unread):
        # if the worker dies first, nothing else would free their pages.
        self.dropped: dict[str, set[int]] = {}
        self._seq_ids = itertools.count()
        self.started = time.monotonic()

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
            for req in [r for r in self.requests.values() if r.client == client]:
                self._abort(req, None)

    def _finish(self, req: Request, final: protocol.Final | None) -> None:
        """End a request once: forget it and send its Final (None: the client is gone)."""
        if self.requests.pop((req.client, req.request_id), None) is None:
            return
        del self.by_seq[req.seq_id]
        if self.partitioner is not None and final is not None and final.finish_reason in ("stop", "length"):
            self._observe(req, final)
        if self.moderation is not None:  # None: the Final waits for the monitor's last scores
            final = self.moderation.finish(req, final)
        if final is not None:
            self._send_client(req.client, final)

    def _abort(self, req: Request, final: protocol.Final | None) -> None:
        """End a request that a worker still holds."""
        self._drop(req)
        self._finish(req, final)

    def _drop(self, req: Request) -> None:
        """The worker holding the sequence drops it and frees its pages (a no-op if it already
        left: see on_prefill_done); should the worker die first, recover() frees them."""
        self.supervisor.send(req.where, protocol.AbortSeqs([req.seq_id]))
        dropped = self.dropped.setdefault(req.where, set())
        dropped.add(req.seq_id)
        if len(dropped) > PRUNE_DROPPED:  # keep those still holding pages
            dropped.intersection_update(self.memory.allocator.owners())

    # ---- clients ------------------------------------------------------------------------

    def on_client(self, client: bytes, data: bytes) -> None:
        try:
            msg = protocol.decode(data)
        except protocol.ProtocolError as e:
            name, request_id = protocol.peek(data)
            if name == "GenerateRequest" and request_id and (client, request_id) not in self.requests:
                return self._send_client(client, protocol.Final(request_id, "error", error=str(e)))
            return self._send_client(client, protocol.Reply(request_id, False, error=str(e)))
        if isinstance(msg, protocol.GenerateRequest):
            self.on_generate(client, msg)
        elif isinstance(msg, protocol.AbortRequest):
            req = self.requests.get((client, msg.request_id))
            if req is not None:
                self._abort(req, req.final("abort"))
        elif isinstance(msg, protocol.HealthRequest):
            self._send_client(client, protocol.Reply(msg.request_id, True, self.health()))
        elif isinstance(msg, protocol.StatsRequest):
            self._send_client(client, protocol.Reply(msg.request_id, True, self.stats()))
        elif isinstance(msg, protocol.PartitionRequest):
            error = self.partition({"prefill": msg.prefill_sm, "decode": msg.decode_sm}, "manual")
            self._send_client(client, protocol.Reply(msg.request_id, error is None,
                                                     {} if error else self.partition_stats(), error))
        else:
            self._send_client(client, protocol.Reply(getattr(msg, "request_id", ""), False,
                                                     error=f"{type(msg).__name__} is not a client message"))

    def on_generate(self, client: bytes, msg: protocol.GenerateRequest) -> None:
        def reject(error: str):
            self._send_client(client, protocol.Final(msg.request_id, "error", error=error))
        if (client, msg.request_id) in self.requests:  # not a Final: that id's stream is live
            return self._send_client(client, protocol.Reply(msg.request_id, False,
                                                            error=f"request id {msg.request_id!r} is already in use"))
        try:
            params = SamplingParams(**msg.params)
        except TypeError as e:
            return reject(f"bad sampling parameters: {e}")
        mem = self.memory
        try:
            if (msg.prompt is None) == (msg.prompt_ids is None):
                raise UserError("give exactly one of prompt and prompt_ids")
            prompt_ids = msg.prompt_ids if msg.prompt is None else mem.tokenizer.encode(msg.prompt)
            check_request(prompt_ids, params, mem.model_config.vocab_size, mem.max_model_len,
                          mem.config.page_size, mem.num_pages)
        except UserError as e:
            return reject(str(e))
        if msg.moderate and self.moderation is None:
            return reject("this server has no content monitor (start it with --scm ADDR)")
        req = Request(client, msg.request_id, next(self._seq_ids), prompt_ids, params,
                      params.resolved_seed(), Detokenizer(mem.tokenizer, params.stop))
        error = self.moderation and self.moderation.open(req, msg.prompt, msg.moderate)
        if error:
            return reject(error)
        req.where = self.prefill_role
        if self.partitioner is not None:
            self.partitioner.arrived(req.arrival)
        self.requests[(client, msg.request_id)] = req
        self.by_seq[req.seq_id] = req
        self.supervisor.send(self.prefill_role, protocol.RunSeqs([req.state()]))

    # ---- workers ------------------------------------------------------------------------

    def on_worker(self, identity: bytes, data: bytes) -> None:
        msg = protocol.decode(data, protocol.MAX_WORKER_MESSAGE_BYTES)
        if isinstance(msg, protocol.WorkerHello):
            return self.supervisor.hello(identity, msg)
        worker = self.supervisor.handle_of(identity)
        if worker is None:
            return  # a dead worker's last words: its requests were already recovered
        if isinstance(msg, protocol.WorkerReady):
            if worker.state is WorkerState.PREPARING:  # called up by a switch
                self.switcher.on_ready(worker, msg.prepare_parts_s)
            else:
                self.supervisor.open(worker)
        elif isinstance(msg, protocol.PrefillDone):
            self.switcher.on_output(worker)
            self.on_prefill_done(msg)
        elif isinstance(msg, protocol.DecodeStep):
            self.switcher.on_output(worker)
            self.on_decode_step(msg)
            if self.switcher.on_last_step(worker, msg):
                self._settle()
        elif isinstance(msg, protocol.StepTimes):
            worker.step_times = (msg, time.monotonic())
        elif isinstance(msg, protocol.HandedOver):
            self.switcher.on_handed_over(worker, msg)
            self._settle()
        elif isinstance(msg, protocol.Preempted):
            for state in msg.seqs:
                req = self.by_seq.get(state.seq_id)
                if req is not None:
                    req.where = self.prefill_role
                    self.supervisor.send(self.prefill_role, protocol.RunSeqs([req.state()]))

    def on_prefill_done(self, msg: protocol.PrefillDone) -> None:
        """First tokens. Until the hand-off reaches decode, the controller holds these pages."""
        handoff = []
        for state, finished in zip(msg.seqs, msg.finished):
            req = self.by_seq.get(state.seq_id)
            if req is None or not self.on_token(req, state.token_ids[-1], finished):
                if finished is None:  # ended here (aborted, or a stop string): free its pages
                    self.memory.allocator.free_owner(state.seq_id)
                continue
            req.where = "decode"
            handoff.append(state)
        # A failed send to one client aborts all its requests, those already in handoff too
        # (their AbortSeqs went to decode ahead of them): keep them out and free their pages here.
        for state in [s for s in handoff if s.seq_id not in self.by_seq]:
            handoff.remove(state)
            self.memory.allocator.free_owner(state.seq_id)
        if handoff:
            self.supervisor.send("decode", protocol.RunSeqs(handoff))

    def on_decode_step(self, msg: protocol.DecodeStep) -> None:
        for seq_id, token, finished in zip(msg.seq_ids, msg.tokens, msg.finished):
            req = self.by_seq.get(seq_id)
            if req is not None and not self.on_token(req, token, finished) and finished is None:
                self._drop(req)  # a stop string

    def on_token(self, req: Request, token: int, finished: str | None) -> bool:
        """Stream one new token; False if the request has ended (worker's reason or a stop string)."""
        text, stopped = req.add_token(token)
        if stopped or finished is not None:
            self._finish(req, req.final("stop" if stopped else finished, text, [token]))
            return False
        delta = req.delta(text, token)
        if self.moderation is None or not self.moderation.hold(req, delta):
            self._send_client(req.client, delta)
        return (req.client, req.request_id) in self.requests  # False if the client vanished

    def recover(self, role: str) -> None:
        """A worker died: reclaim the pages of everything it held and resume it through prefill
        (recomputing the K/V), or end it with an error if it has already survived a crash."""
        for seq_id in self.dropped.pop(role, ()):  # ended here, perhaps never dropped there
            self.memory.allocator.free_owner(seq_id)
        for req in [r for r in self.requests.values() if r.where == role]:
            self.memory.allocator.free_owner(req.seq_id)
            req.restarts += 1
            if req.restarts > MAX_RESTARTS_PER_REQUEST:
                self._finish(req, req.final("error", error=f"the {role} worker died twice while serving it"))
                continue
            req.where = self.prefill_role
            self.supervisor.send(self.prefill_role, protocol.RunSeqs([req.state()]))

    def _free_held_back(self) -> None:
        """Free the pages that workers now dead (or killed in their wake) held back for a step
        in flight: their requests had ended. A live worker's are its own to free."""
        live = self.supervisor.live_pids()
        for owner in self.memory.allocator.owners():
            if (pid := releaser(owner)) is not None and pid not in live:
                self.memory.allocator.free_owner(owner)

    def _observe(self, req: Request, final: protocol.Final) -> None:
        """Feed a finished request to the partitioner; log its decision and act on it. Not while
        a switch is under way: the request ran on the old split, and a decision now would find
        the switch running. _settle starts a new window once it is done."""
        if self.switcher.active:
            return
        tpot = sum(final.itl_s) / len(final.itl_s) if final.itl_s else None
        decision = self.partitioner.observe(req.arrival, final.ttft_s, tpot, time.monotonic())
        if decision is None:
            return
        record = decision.to_dict()
        self.decisions.append(record)
        print(f"semipd: partition decision {json.dumps(record)}", file=sys.stderr, flush=True)
        target = {"prefill": decision.next_prefill_sm, "decode": decision.next_decode_sm}
        if self.partition(target, f"partitioner: {decision.action}") is not None:
            self._settle()  # could not switch now: the partitioner keeps the split in effect

    def _settle(self) -> None:
        """Once no switch is under way, tell the partitioner which split is in effect from now."""
        if self.partitioner is not None and not self.switcher.active:
            workers = self.supervisor.workers
            self.partitioner.switched(workers["prefill"].sm_percent, workers["decode"].sm_percent, time.monotonic())

    def partition(self, shares: dict[str, int], reason: str) -> str | None:
        """Start switching to a new SM split; an error message if it cannot be done now."""
        if self.prefill_role == "unified":
            return "a unified server has no prefill/decode split"
        bad = next((v for v in shares.values() if not 1 <= v <= 100), None)
        if bad is not None:
            return f"SM shares are percentages in [1, 100], got {bad}"
        if self.partitioner is not None:  # it plans on a grid; a split off it is not one it can hold
            try:
                self.partitioner.check((shares["prefill"], shares["decode"]))
            except UserError as e:
                return f"this server moves the split itself (--dynamic): {e}"
        busy = [r for r, v in shares.items() if r in self.switcher.active and self.supervisor.workers[r].sm_percent != v]
        if busy:
            return f"the {busy[0]} worker is already switching; try again when it is done"
        for role, share in shares.items():
            self.switcher.request(role, share, reason)
        return None

    # ---- status -------------------------------------------------------------------------

    def partition_stats(self) -> dict:
        workers = self.supervisor.workers
        return {"mode": "unified" if self.prefill_role == "unified" else "semi-pd",
                "prefill_sm": workers.get("prefill", workers.get("unified")).sm_percent,
                "decode_sm": workers.get("decode", workers.get("unified")).sm_percent,
                "mps": self.mode.mps, "dynamic": self.partitioner is not None,
                "switching": sorted(self.switcher.active), "history": self.switcher.history,
                "decisions": list(self.decisions)}

    def health(self) -> dict:
        # During a switch the role's new worker is closed for the few ms of the handover; its
        # requests queue and the server is serving, not starting.
        serving = self.supervisor.all_ready() or bool(self.switcher.active)
        return {"status": "ok" if serving else "starting",
                "uptime_s": time.monotonic() - self.started, "model": self.memory.config.model,
                "scm": self.moderation and self.moderation.health()}

    def stats(self) -> dict:
        reqs = self.requests.values()
        return {"kv_pages_total": self.memory.num_pages, "kv_pages_free": self.memory.allocator.num_free(),
                "running": sum(bool(r.output_ids) for r in reqs), "waiting": sum(not r.output_ids for r in reqs),
                "workers": {role: {**self.supervisor.stats(role), "switch": self.switcher.stats(role)}
                            for role in self.supervisor.workers},
                "partition": self.partition_stats(),
                "worker_restarts": self.supervisor.restarts, "page_size": self.memory.config.page_size,
                "max_model_len": self.memory.max_model_len,
                "scm": self.moderation and self.moderation.stats()}

    # ---- loop ---------------------------------------------------------------------------

    def serve_forever(self, on_ready=None) -> None:
        self.supervisor.start_all()
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        if self.moderation is not None:
            poller.register(self.moderation.sock, zmq.POLLIN)
        announced = False
        while True:
            events = dict(poller.poll(POLL_MS))
            if self.back in events:
                self._drain(self.back, self.on_worker)
            if self.front in events:
                self._drain(self.front, self.on_client)
            self.switcher.check_timeouts(time.monotonic())
            deaths = self.supervisor.dead()
            for was, worker in deaths:
                if self.switcher.on_death(was, worker):
                    self.recover(worker.role)
                self._settle()
            if deaths:
                self._free_held_back()
            if self.moderation is not None:
                self.moderation.tick()
            if not announced and self.supervisor.all_ready():
                announced = True
                print(f"semipd: serving {self.memory.config.model} at {self.address}", file=sys.stderr, flush=True)
                if self.partitioner is not None:  # switches will come: have standbys ready for them
                    self.switcher.keep_standbys = True
                    for role in self.supervisor.workers:
                        self.supervisor.ensure_standby(role)
                if on_ready:
                    on_ready()

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

    def close(self) -> None:
        for req in list(self.requests.values()):  # every stream ends with one Final, now too
            self._finish(req, req.final("error", error="the server is shutting down"))
        if self.moderation is not None:
            self.moderation.close()
        self.supervisor.stop()
        self.front.close(linger=CLOSE_LINGER_MS)
        self.back.close()
        self.ctx.term()
        self.memory.close()

