"""One step of each kind of forward pass over scheduled sequences: a prefill step (prompt chunks,
first tokens; launched, then finished) and a mixed step (decode rows and prompt chunks in one
pass, launched one ahead)."""

from dataclasses import dataclass

import torch

from semipd.shared.model_runner import ModelRunner
from semipd.shared.pipeline import StepPipeline
from semipd.shared.scheduler import MixedScheduler, PrefillScheduler
from semipd.shared.sequence import Sequence


@dataclass
class PrefillLaunch:
    """A prefill step on its way: the prompts it completes, and their first tokens, on the host
    once `done` has happened (None on the CPU, where a step is done when launched)."""
    ready: list[Sequence]
    tokens: torch.Tensor | None
    done: torch.cuda.Event | None

    def finish(self, sched: PrefillScheduler, allocator, settled: bool) -> list[Sequence]:
        """Wait for the step (not the device: the step's event), cache the full pages it computed
        (and those of earlier steps; settled False: a later step is launched, whose pages wait),
        then append each first token; a sequence that is finished already has its pages freed.
        The completed sequences."""
        if self.done is not None:
            self.done.synchronize()
        sched.cache_computed(settled)
        if self.tokens is None:
            return []
        for seq, token in zip(self.ready, self.tokens.tolist()):
            seq.append(token)
            if seq.finish_reason is not None:
                allocator.free(seq.reset_cache())
        return self.ready


def launch_prefill(runner: ModelRunner, sched: PrefillScheduler, chunks) -> PrefillLaunch:
    """Queue scheduled prompt chunks and the sampling of a first token for each completed prompt,
    without waiting for the GPU; the tokens are copied to the host behind them."""
    logits = runner.prefill_logits(chunks)
    done = {s.seq_id for s in sched.finish_chunks(chunks)}
    rows = [i for i, (s, _) in enumerate(chunks) if s.seq_id in done]
    ready, host = [chunks[i][0] for i in rows], None
    cuda = runner.device.type == "cuda"
    if ready:
        tokens = runner.sample_on_device(ready, logits[rows])
        host = torch.empty(len(ready), dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=True)
    else:
        runner.end_span()
    event = torch.cuda.Event() if cuda else None
    if event is not None:
        event.record()
    return PrefillLaunch(ready, host, event)


def mixed_step(runner: ModelRunner, sched: MixedScheduler, pipeline: StepPipeline) -> list[tuple[Sequence, int]]:
    """Launch one forward pass over the decode batch (one token each) and the prompt chunks
    scheduled beside it, then read the step launched before: (sequence, new token) pairs, the
    finished sequences already out of the scheduler."""
    read, finish = [], sched.decode.finish
    scheduled = sched.schedule(preempt=pipeline.inflight is None)
    if scheduled is None:  # the pool is short: preempting needs every token known
        read = finish(pipeline.drain())
        scheduled = sched.schedule()
    batch, chunks = scheduled
    feed = pipeline.feed(batch)
    if chunks:
        logits = runner.prefill_logits([(s, 1) for s in batch] + chunks, feed)
        done = {s.seq_id for s in sched.prefill.finish_chunks(chunks)}
        rows = list(range(len(batch))) + [len(batch) + i for i, (s, _) in enumerate(chunks) if s.seq_id in done]
        ready = [chunks[i - len(batch)][0] for i in rows[len(batch):]]
        for seq in ready:
            sched.decode.add(seq)
        return read + finish(pipeline.launch(batch + ready, logits[rows]))
    if batch:
        return read + finish(pipeline.launch(batch, runner.decode(batch, feed)))  # the CUDA-graph path
    return read + finish(pipeline.drain())
