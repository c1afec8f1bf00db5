"""What the prefill and decode processes share: the link to the controller and the mapping of its
memory (weights, KV pool, page allocator) into this process without copying."""

import argparse
import os
import signal
import sys
from dataclasses import asdict

import torch
import zmq

from shared import protocol
from shared.config import ModelConfig, load_hf_config
from shared.engine import DTYPES
from shared.loader import build_model
from shared.model_runner import ModelRunner
from shared.page_allocator import PageAllocator
from shared.sampling_params import SamplingParams
from shared.sequence import Sequence
from shared.shared_memory import SharedArena


class ControllerLink:
    """A DEALER to the controller's worker socket. Identity role-pid, so that a replacement
    worker is a new peer and nothing meant for its predecessor reaches it."""

    def __init__(self, address: str, role: str):
        self.role = role
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"{role}-{os.getpid()}".encode())
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(address)
        self.parent = os.getppid()

    def send(self, msg) -> None:
        self.sock.send(protocol.encode(msg))

    def receive(self, timeout_ms: int) -> list:
        """Every message waiting now, after waiting up to timeout_ms for the first."""
        out = []
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    out.append(protocol.decode(self.sock.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        if os.getppid() != self.parent:  # the controller died: nothing left to serve
            sys.exit(0)
        return out

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class Worker:
    """Connects, maps the controller's memory and builds a model runner over it."""

    def __init__(self, address: str, role: str):
        self.link = ControllerLink(address, role)
        self.link.send(protocol.WorkerHello(role=role, pid=os.getpid()))
        init = None
        while init is None:
            init = next((m for m in self.link.receive(1000) if isinstance(m, protocol.WorkerInit)), None)
        self.init = init
        device = torch.device(init.device)
        dtype = DTYPES[init.dtype]
        self.model_config = ModelConfig.from_hf(load_hf_config(init.model))
        self.arenas = [SharedArena.open(h) for h in (init.weights, init.k_pool, init.v_pool)]
        model = build_model(self.model_config, device, dtype, self.arenas[0].tensor)
        model.bind_kv_cache(self.arenas[1].view(dtype, init.kv_shape), self.arenas[2].view(dtype, init.kv_shape))
        self.allocator = PageAllocator.attach(init.allocator)
        self.runner = ModelRunner(model, init.page_size, init.max_model_len, init.max_num_seqs,
                                  init.cuda_graphs and role == "decode")
        self.link.send(protocol.WorkerReady(role=role, pid=os.getpid()))

    def to_sequence(self, state: protocol.SeqState) -> Sequence:
        seq = Sequence(state.seq_id, state.token_ids[:state.num_prompt], SamplingParams(**state.params),
                       self.model_config.eos_token_ids, state.seed)
        seq.token_ids = list(state.token_ids)
        seq.block_table, seq.num_cached = list(state.block_table), state.num_cached
        return seq


def to_state(seq: Sequence) -> protocol.SeqState:
    return protocol.SeqState(seq.seq_id, seq.token_ids, seq.num_prompt, asdict(seq.params), seq.seed,
                             seq.block_table, seq.num_cached)


def worker_main(role: str, loop) -> None:
    """Entry point of `python -m services.<role> --controller ADDR`."""
    ap = argparse.ArgumentParser(prog=f"python -m services.{role}")
    ap.add_argument("--controller", required=True, help="the controller's worker socket")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    loop(Worker(args.controller, role))
