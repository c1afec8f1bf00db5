"""What every worker process (prefill, decode, unified) shares: the link to the controller and the mapping of its
memory (weights, KV pool, page allocator) into this process without copying."""

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import zmq

from semipd.shared import protocol
from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.engine_config import DTYPES
from semipd.shared.loader import build_model
from semipd.shared.model_runner import ModelRunner
from semipd.shared.page_allocator import PageAllocator
from semipd.shared.parallel.group import TPGroup
from semipd.shared.parallel.mirror import LeadRunner, follow, join
from semipd.shared.runtime import parent_pid
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import Sequence
from semipd.shared.shared_memory import SharedArena


class ControllerLink:
    """A DEALER to the controller's worker socket. Identity role-pid, so that a replacement
    worker is a new peer and nothing meant for its predecessor reaches it."""

    def __init__(self, address: str, role: str):
        self.role = role
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"{role}-{os.getpid()}".encode())
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_WORKER_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(address)
        self.parent = parent_pid()  # not getppid(): the controller may have died already

    def send(self, msg) -> None:
        self.sock.send(protocol.encode(msg))

    def receive(self, timeout_ms: int) -> list:
        """Every message waiting now, after waiting up to timeout_ms for the first."""
        out = []
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    out.append(protocol.decode(self.sock.recv(zmq.NOBLOCK), protocol.MAX_WORKER_MESSAGE_BYTES))
                except zmq.Again:
                    break
        if os.getppid() != self.parent:  # the controller died: nothing left to serve
            sys.exit(0)
        return out

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class Worker:
    """Connects, maps the controller's memory and builds a model runner over it.

    With tensor parallelism (WorkerInit.tp_size > 1) a role is that many such processes, each
    mapping its rank's shard, in one process group; rank 0 alone talks to the controller after
    its hello and runs the role's loop, the others mirror its model calls (parallel/mirror.py).

    A worker waits for its WorkerInit as long as the controller likes: a standby process sits
    here with everything imported and no CUDA context, until a new SM split calls it up."""

    def __init__(self, address: str, role: str):
        self.link = ControllerLink(address, role)
        self.link.send(protocol.WorkerHello(role=role, pid=os.getpid()))
        init = None
        while init is None:
            for msg in self.link.receive(1000):
                if isinstance(msg, protocol.Shutdown):
                    sys.exit(0)
                init = msg if isinstance(msg, protocol.WorkerInit) else init
        self.init = init
        if init.sm_percent is not None:
            # MPS reads the quota when the CUDA context is created, which happens below.
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(init.sm_percent)
            # Where quotas overlap, decode's short steps go first and prefill's long kernels fill
            # the SMs they leave (MPS client priority 1 is "below normal"; a scheduling hint).
            os.environ["CUDA_MPS_CLIENT_PRIORITY"] = "1" if role == "prefill" else "0"
        began = time.perf_counter()
        device = torch.device(init.device)
        dtype = DTYPES[init.dtype]
        self.model_config = ModelConfig.from_hf(load_hf_config(init.model))
        self.arenas = [SharedArena.open(h) for h in (init.weights, init.k_pool, init.v_pool)]
        self.tp, self.steps = TPGroup(), None
        if init.tp_size > 1:
            if device.type == "cpu":
                torch.set_num_threads(1)  # N ranks of torch's default width on shared cores crawl
            self.tp, self.steps = join(init.tp_init, init.tp_rank, init.tp_size, device)
        model = build_model(self.model_config, device, dtype, self.arenas[0].tensor, self.tp)
        model.bind_kv_cache(self.arenas[1].view(dtype, init.kv_shape), self.arenas[2].view(dtype, init.kv_shape))
        self.allocator = PageAllocator.attach(init.allocator)
        mapped = time.perf_counter()  # the CUDA context is made and the controller's memory mapped
        graphs = init.cuda_graphs
        runner = LeadRunner if self.steps is not None and self.tp.rank == 0 else ModelRunner
        self.runner = runner(model, init.page_size, init.max_model_len, init.max_num_seqs,
                             cuda_graphs=graphs and role != "prefill",
                             prefill_graph_tokens=init.max_batched_tokens if graphs and role != "decode" else 0)
        if self.steps is not None:
            self.steps.ready()
            if self.tp.rank > 0:
                return  # it says nothing more: rank 0 speaks for the role
            self.runner.lead(self.steps, self.tp)
        parts = {"context_and_map": mapped - began, **self.runner.setup_s}
        self.link.send(protocol.WorkerReady(role=role, pid=os.getpid(), prepare_parts_s=parts))

    def apply_messages(self, timeout_ms: int, sched, read_last_step=lambda: None, settle=lambda: None) -> bool:
        """Apply the controller's messages to a scheduler (add, drop, held, inherit); False once
        this worker must stop. A Handover comes between steps. What the worker holds goes at
        once, pages and all, sequences in a step still in flight with their newest token counted
        as in flight (SeqState.num_in_flight); then `read_last_step` waits for that step and
        sends its tokens (a DecodeStep that the controller passes on: DecodeScheduler.inherit).
        The successor thus has its sequences while the last step runs, and needs only their
        tokens when it ends. `settle` runs before any message but new work is applied: a loop
        whose launched step must end before pages leave it (the prefill loop) finishes it there."""
        for msg in self.link.receive(timeout_ms):
            if not isinstance(msg, protocol.RunSeqs):
                settle()
            if isinstance(msg, protocol.RunSeqs):
                for state in msg.seqs:
                    sched.add(self.to_sequence(state))
            elif isinstance(msg, protocol.AbortSeqs):
                sched.drop(set(msg.seq_ids))
            elif isinstance(msg, protocol.DecodeStep):
                sched.inherit(msg)
            elif isinstance(msg, protocol.Handover):
                held = sched.held()
                follows = any(s.num_in_flight for s in held)
                self.link.send(protocol.HandedOver([to_state(s) for s in held], follows))
                read_last_step()
                return False
            elif isinstance(msg, protocol.Shutdown):
                return False
        return True

    def to_sequence(self, state: protocol.SeqState) -> Sequence:
        seq = Sequence(state.seq_id, state.token_ids[:state.num_prompt], SamplingParams(**state.params),
                       self.model_config.eos_token_ids, state.seed)
        seq.token_ids = list(state.token_ids)
        seq.block_table, seq.num_cached = list(state.block_table), state.num_cached
        seq.num_in_flight = state.num_in_flight
        return seq


class StepTimer:
    """Times a worker's steps and reports them (StepTimes) about once a second while it works.

    Wall time runs from scheduling to sending a step's results; GPU time from the forward
    pass's first kernel to the sampler's last (the runner's CUDA event pairs), read only once
    the events have completed, so timing never makes the loop wait."""

    REPORT_S = 1.0

    def __init__(self, link: ControllerLink, runner: ModelRunner):
        self.link, self.runner = link, runner
        self.cuda = runner.device.type == "cuda"
        if self.cuda:
            runner.gpu_spans = []  # the runner records CUDA event pairs from now on
        self._reset()

    def _reset(self) -> None:
        self.since, self.steps, self.seqs, self.busy, self.gpu = None, 0, 0, 0.0, 0.0

    def start(self) -> None:
        self.began = time.perf_counter()
        if self.since is None:  # a report covers from its first step on, not the idle time before
            self.since = self.began

    def stop(self, num_seqs: int) -> None:
        now = time.perf_counter()
        self.steps, self.seqs, self.busy = self.steps + 1, self.seqs + num_seqs, self.busy + now - self.began
        spans = self.runner.gpu_spans or []
        while spans and spans[0][1].query():
            start, end = spans.pop(0)
            self.gpu += start.elapsed_time(end) / 1e3
        if now - self.since >= self.REPORT_S:
            self.link.send(protocol.StepTimes(self.steps, self.seqs, self.busy,
                                              self.gpu if self.cuda else None, now - self.since))
            self._reset()


def send_tokens(link: ControllerLink, read: list[tuple[Sequence, int]]) -> None:
    """One DecodeStep with a step's new tokens (finished sequences carry their reason)."""
    if read:
        link.send(protocol.DecodeStep([s.seq_id for s, _ in read], [t for _, t in read],
                                      [s.finish_reason for s, _ in read]))


def to_state(seq: Sequence) -> protocol.SeqState:
    return protocol.SeqState(seq.seq_id, seq.token_ids, seq.num_prompt, asdict(seq.params), seq.seed,
                             seq.block_table, seq.num_cached, seq.num_in_flight)


def preload() -> None:
    """Import what the GPU path needs now, not when called up: a cold import of these costs
    seconds, while the switch to a new SM split should cost milliseconds. None of them creates
    a CUDA context (that would fix the MPS quota too early)."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config  # noqa: F401 (lazy modules, slow)
    try:
        import cupy  # noqa: F401
        import semipd.shared.kernels.triton_attention  # noqa: F401
        import semipd.shared.kernels.triton_fused  # noqa: F401
        import semipd.shared.kernels.triton_sampling  # noqa: F401
    except ImportError:  # a CPU-only machine: nothing more to load
        pass


def worker_main(role: str, loop) -> None:
    """Entry point of `python -m semipd.services.<role> --controller ADDR`."""
    ap = argparse.ArgumentParser(prog=f"python -m semipd.services.{role}")
    ap.add_argument("--controller", required=True, help="the controller's worker socket")
    args = ap.parse_args()
    # The controller stops its workers (Shutdown, then SIGKILL past its deadline) or they die with
    # it; a signal to the whole group (a terminal's Ctrl-C, honcho's or systemd's SIGTERM) is its
    # to handle, and would end a drain's requests here. The controller also starts each worker in
    # a process group of its own, so that none reaches it before these lines.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    preload()
    try:
        worker = Worker(args.controller, role)
        if worker.tp.rank > 0:
            follow(worker.runner, worker.steps, worker.tp)
        else:
            loop(worker)
            if worker.steps is not None:
                worker.runner.stop_followers()
        worker.link.close()  # its last messages (a hand-over's) go out, within the socket's linger
        code = 0
    except SystemExit as e:  # stopped while waiting for its init, or the controller is gone
        code = e.code
    # As multiprocessing's children do: tearing down an interpreter with torch loaded takes a
    # second or more on a loaded machine and frees nothing the kernel would not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
