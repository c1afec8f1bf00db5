"""One step of each kind of forward pass over scheduled sequences: a prefill step (prompt chunks,
first tokens) and a mixed step (decode rows and prompt chunks in one pass, launched one ahead)."""

from semipd.shared.model_runner import ModelRunner
from semipd.shared.pipeline import StepPipeline
from semipd.shared.scheduler import MixedScheduler, PrefillScheduler
from semipd.shared.sequence import Sequence


def prefill_step(runner: ModelRunner, sched: PrefillScheduler, allocator, chunks) -> list[Sequence]:
    """Run scheduled prompt chunks; sample a first token for each completed prompt and return
    those sequences, their full pages cached (a sequence that is already finished has its pages
    freed). Sampling waits for the step; a step that samples nothing is waited for by the
    caller, and its pages are cached at the next schedule."""
    logits = runner.prefill_logits(chunks)
    done = {s.seq_id for s in sched.finish_chunks(chunks)}
    rows = [i for i, (s, _) in enumerate(chunks) if s.seq_id in done]
    ready = [chunks[i][0] for i in rows]
    if ready:
        tokens = runner.sample(ready, logits[rows])
        sched.cache_computed()
        for seq, token in zip(ready, tokens):
            seq.append(token)
            if seq.finish_reason is not None:
                allocator.free(seq.reset_cache())
    else:
        runner.end_span()
    return ready


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
