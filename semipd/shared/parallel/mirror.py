"""How the ranks of a serving role run one model: rank 0 schedules, the others mirror its steps.

Rank 0 of a role keeps the controller link, the scheduler and every call to the page allocator,
so the worker loops are those of one GPU. Its runner (`LeadRunner`) broadcasts each model call
(a prefill or decode step's rows, a sampling) to the other ranks before making it, and each of
them (`follow`) makes the same call on its shard: every collective inside the model then meets
its counterparts, in the same order, with the same shapes.

A step's rows go as msgpack over a byte tensor (no pickle): per sequence what the runner reads,
its block table and the tokens from its first uncached one on. Sampled tokens go by broadcast of
the device tensor right after the sampling, so that the step pipeline's feed (tokens still on the
device) works on every rank, without a host sync on rank 0.
"""

from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from semipd.shared.model_runner import ModelRunner
from semipd.shared.parallel.group import TPGroup
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import Sequence


# A rank > 0 waits in a broadcast for as long as its role is idle: gloo's default (30 minutes)
# would end an idle server's groups. A dead rank fails the others' collectives at once anyway.
GROUP_TIMEOUT = timedelta(days=365)


def join(init_method: str, rank: int, size: int, device: torch.device) -> tuple[TPGroup, "StepChannel"]:
    """Join the role's process group (NCCL on CUDA, gloo on the CPU), and the gloo channel that
    carries rank 0's steps (the same group on the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=size,
                            timeout=GROUP_TIMEOUT)
    steps = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if cuda else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD), StepChannel(steps)


class StepChannel:
    """Rank 0's commands to the other ranks of its group: a length, then the msgpack bytes.
    `group` is a gloo group: the bytes are built and read on the host."""

    def __init__(self, group: "dist.ProcessGroup"):
        self.group = group

    def send(self, command: list) -> None:
        data = torch.frombuffer(bytearray(msgpack.packb(command)), dtype=torch.uint8)
        dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), 0, group=self.group)
        dist.broadcast(data, 0, group=self.group)

    def ready(self) -> None:
        """Wait until every rank has built its runner (rank 0 then says it is ready)."""
        dist.barrier(group=self.group)

    def receive(self) -> list:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.group)
        return msgpack.unpackb(data.numpy().tobytes())


def _row(seq: Sequence) -> list:
    """What the runner reads of a sequence: its tokens from the first one a step may read on
    (the first uncached one, or the newest), their offset, tokens in flight, cached tokens and
    its block table."""
    offset = min(seq.num_cached, max(len(seq.token_ids) - 1, 0))
    return [offset, seq.token_ids[offset:], seq.num_in_flight, seq.num_cached, seq.block_table]


def _sequence(row: list) -> Sequence:
    """A sequence the runner reads as it would read the one `_row` described (tokens before the
    offset stand as 0: no step reads them)."""
    offset, tokens, in_flight, cached, table = row
    seq = Sequence(0, [], SamplingParams())
    seq.token_ids, seq.num_in_flight, seq.num_cached, seq.block_table = [0] * offset + tokens, in_flight, cached, table
    return seq


class LeadRunner(ModelRunner):
    """Rank 0's runner: each step and sampling is sent to the other ranks, then made here,
    once `lead` is called: the runner's own warm-up, while it is built, runs on every rank alike."""

    steps: StepChannel | None = None
    tp: TPGroup = TPGroup()
    sampled: torch.Tensor | None = None  # the last sampled tokens, which any feed comes from

    def lead(self, steps: StepChannel, tp: TPGroup) -> None:
        self.steps, self.tp = steps, tp

    def _feed_rows(self, feed) -> list[int] | None:
        if feed is None:
            return None
        if feed[0] is not self.sampled:
            raise RuntimeError("a feed from a step other than the last sampled one cannot be mirrored")
        return feed[1]

    def prefill_logits(self, chunks, feed=None):
        if self.steps is not None:
            self.steps.send(["prefill", [_row(s) + [n] for s, n in chunks], self._feed_rows(feed)])
        return super().prefill_logits(chunks, feed)

    def decode(self, seqs, feed=None):
        if self.steps is not None:
            self.steps.send(["decode", [_row(s) for s in seqs], self._feed_rows(feed)])
        return super().decode(seqs, feed)

    def sample_on_device(self, seqs, logits):
        tokens = super().sample_on_device(seqs, logits)
        if self.steps is not None:
            self.steps.send(["sample", len(seqs)])
            dist.broadcast(tokens, 0, group=self.tp.group)
            self.sampled = tokens
        return tokens

    def stop_followers(self) -> None:
        self.steps.send(["stop"])


def follow(runner: ModelRunner, steps: StepChannel, tp: TPGroup) -> None:
    """A rank > 0: make rank 0's model calls until it stops. Outputs are thrown away; only the
    sampled tokens are kept, received from rank 0, for the next step's feed."""
    sampled = None
    while True:
        command = steps.receive()
        kind = command[0]
        if kind == "stop":
            return
        if kind == "sample":
            sampled = torch.empty(command[1], dtype=torch.int64, device=runner.device)
            dist.broadcast(sampled, 0, group=tp.group)
            continue
        rows, feed_rows = command[1], command[2]
        feed = None if feed_rows is None else (sampled, feed_rows)
        if kind == "prefill":
            runner.prefill_logits([(_sequence(r[:-1]), r[-1]) for r in rows], feed)
        else:
            runner.decode([_sequence(r) for r in rows], feed)
