"""Decode loop: continuous batching, each step launched before the previous one is read.

Each iteration launches step N+1 on the GPU before reading step N's tokens, so the host's work
between steps (reading tokens, stop checks, the DecodeStep message, scheduling and building the
next step's inputs) runs while the GPU computes instead of leaving it idle. A sequence's token
from step N feeds step N+1 on the device; on the host it is a PENDING placeholder until read.
What running ahead costs:
- a sequence that samples a stop token at step N has already been given a row in step N+1,
  whose token is thrown away (max_tokens is known in advance: such a sequence sits out);
- pages of a finished, aborted or preempted sequence may still be written by a launched step,
  so they go back to the pool only once that step is done (PageRelease);
- before a Handover or a preemption the step in flight is read first (drain), so sequences
  leave this process with every token known.
Between steps it admits handed-off sequences and drops aborted ones; each step grows block
tables as sequences cross page boundaries (preempting the youngest when the pool is short) and
reports its tokens in one message."""

from dataclasses import dataclass

import torch

from shared import protocol
from shared.scheduler import DecodeScheduler
from shared.sequence import PENDING, Sequence
from shared.worker import StepTimer, Worker, to_state

IDLE_POLL_MS = 100


class PageRelease:
    """Frees pages once no launched step can still write into them (steps finish in order)."""

    def __init__(self, allocator):
        self.allocator = allocator
        self.launched = self.done = 0           # step numbers
        self.waiting: list[tuple[int, list[int]]] = []

    def __call__(self, pages: list[int]) -> None:
        if self.launched == self.done:
            self.allocator.free(pages)
        else:
            self.waiting.append((self.launched, pages))

    def step_done(self, number: int) -> None:
        self.done = number
        for step, pages in [w for w in self.waiting if w[0] <= number]:
            self.allocator.free(pages)
        self.waiting = [w for w in self.waiting if w[0] > number]


@dataclass
class Step:
    number: int
    batch: list[Sequence]
    slots: list[int]                 # where each sequence's PENDING placeholder is
    tokens: torch.Tensor             # sampled, on the device (feeds the next step)
    host: torch.Tensor               # their copy on the host, complete once `done` is
    done: torch.cuda.Event | None    # None on the CPU, where everything is synchronous


def run(worker: Worker) -> None:
    init, link, runner = worker.init, worker.link, worker.runner
    release = PageRelease(worker.allocator)
    sched = DecodeScheduler(worker.allocator, init.page_size, init.max_num_seqs, release)
    timer = StepTimer(link, runner)
    cuda = runner.device.type == "cuda"
    inflight: Step | None = None

    def launch(batch: list[Sequence]) -> Step:
        feed = None
        if inflight is not None:
            rows = {id(s): i for i, s in enumerate(inflight.batch)}
            feed = (inflight.tokens, [rows[id(s)] if s.token_ids[-1] == PENDING else -1 for s in batch])
        tokens = runner.sample_on_device(batch, runner.decode(batch, feed))
        host = torch.empty(len(batch), dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event() if cuda else None
        if done is not None:
            done.record()
        slots = []
        for seq in batch:  # the step writes the K/V of each newest token and samples the next
            seq.num_cached += 1
            slots.append(seq.num_tokens)
            seq.token_ids.append(PENDING)
        release.launched += 1
        return Step(release.launched, batch, slots, tokens, host, done)

    def read(step: Step) -> None:
        if step.done is not None:
            step.done.synchronize()
        release.step_done(step.number)
        alive = {id(s) for s in sched.running}  # not aborted, not finished at the step before
        out = []
        for seq, slot, token in zip(step.batch, step.slots, step.host.tolist()):
            if id(seq) in alive:
                seq.fill(slot, token)
                out.append((seq, token))
        sched.remove([seq for seq, _ in out if seq.finish_reason is not None])
        if out:
            link.send(protocol.DecodeStep([s.seq_id for s, _ in out], [t for _, t in out],
                                          [s.finish_reason for s, _ in out]))

    def drain() -> None:
        nonlocal inflight
        if inflight is not None:
            read(inflight)
            inflight = None

    while True:
        if not worker.apply_messages(0 if sched.running or inflight else IDLE_POLL_MS, sched, drain):
            return
        if not sched.running and inflight is None:
            continue
        timer.start()
        scheduled = sched.schedule(preempt=inflight is None)
        if scheduled is None:  # the pool is short: finish the step in flight, then preempt
            drain()
            scheduled = sched.schedule()
        batch, preempted = scheduled
        if preempted:
            link.send(protocol.Preempted([to_state(s) for s in preempted]))
        step = launch(batch) if batch else None
        drain()
        inflight = step
        if step is not None:
            timer.stop(len(batch))
