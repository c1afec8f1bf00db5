"""Steps launched one ahead of the host: step N+1 goes to the GPU before step N's tokens are read.

The host's work between steps (reading tokens, stop checks, the step's message, scheduling and
building the next inputs) then runs while the GPU computes instead of leaving it idle. A token
sampled by step N feeds step N+1 on the device (`feed`); until step N is read, only the step in
flight holds it and the host counts it (`Sequence.num_in_flight`). What running ahead costs:
- a sequence that samples a stop token at step N has already been given a row in step N+1,
  whose token is thrown away (max_tokens is known in advance: such a sequence sits out);
- pages of a finished, aborted or preempted sequence may still be written by a launched step.
  Where another process allocates from the same pool (the decode worker of semi-PD) they go back
  only once that step is done (`free`), tagged releasing(pid) meanwhile so that the controller can
  reclaim them if this process dies; within one process the next writer queues behind it on the
  same CUDA stream, so pages can go back at once;
- before a preemption the step in flight is read first (`drain`), so sequences leave with every
  token known; a Handover sends them at once and that step's tokens after them (services/worker.py).
On the CPU every step completes when launched and the pipeline is simply synchronous."""

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from semipd.shared.model_runner import ModelRunner
from semipd.shared.sequence import Sequence


@dataclass
class Step:
    seqs: list[Sequence]
    tokens: torch.Tensor             # sampled, on the device (feeds the next step)
    host: torch.Tensor               # their copy on the host, complete once `done` is
    done: torch.cuda.Event | None    # None on the CPU, where everything is synchronous


class StepPipeline:
    """`alive()` names the sequences whose tokens still matter (not finished, aborted or
    preempted since their step was launched); a step's tokens for any other are thrown away."""

    def __init__(self, runner: ModelRunner, allocator, alive: Callable[[], Iterable[Sequence]]):
        self.runner, self.allocator, self.alive = runner, allocator, alive
        self.cuda = runner.device.type == "cuda"
        self.inflight: Step | None = None
        self.held_back: list[list[int]] = []  # pages freed while the step in flight may write them

    def feed(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]] | None:
        """For the runner: the in-flight step's tokens and, per sequence, its row there (-1 where
        the sequence has no token in flight)."""
        if self.inflight is None:
            return None
        rows = {id(s): i for i, s in enumerate(self.inflight.seqs)}
        return self.inflight.tokens, [rows[id(s)] if s.num_in_flight else -1 for s in seqs]

    def launch(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        """Sample the next token of each sequence from `logits` on the device, then read the
        step launched before (returned as in `drain`). The K/V of every token but the new
        one is written by then."""
        tokens = self.runner.sample_on_device(seqs, logits)
        host = torch.empty(len(seqs), dtype=tokens.dtype, pin_memory=self.cuda)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event() if self.cuda else None
        if done is not None:
            done.record()
        for seq in seqs:
            seq.launched()
        read = self.drain()
        self.inflight = Step(seqs, tokens, host, done)
        return read

    def drain(self) -> list[tuple[Sequence, int]]:
        """Wait for the step in flight; (sequence, token) for each of its live sequences, the
        token received (a finished sequence has its finish_reason set)."""
        step, self.inflight = self.inflight, None
        if step is None:
            return []
        if step.done is not None:
            step.done.synchronize()
        for pages in self.held_back:  # freed before this step's successor was scheduled
            self.allocator.free(pages)
        self.held_back = []
        alive, out = {id(s) for s in self.alive()}, []
        for seq, token in zip(step.seqs, step.host.tolist()):
            if id(seq) in alive:
                seq.receive(token)
                out.append((seq, token))
            else:  # finished or dropped meanwhile
                seq.forget_in_flight()
        return out

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool once no launched step can write them: at once with no step in
        flight, else when it is read (one step at most is ever in flight, and the next one is
        scheduled after these pages' sequence has left, so it cannot write them)."""
        if self.inflight is None:
            self.allocator.free(pages)
        elif pages:
            self.allocator.release_later(pages)
            self.held_back.append(pages)
