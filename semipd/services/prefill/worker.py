"""Prefill loop: take prompts from the controller, compute them in token-budget batches (long
prompts in chunks), sample each first token and hand the sequence back as metadata.

Each step is launched before the one before it is finished (shared/steps.py), so the host's work
between steps (the last step's message, scheduling and packing the next inputs) runs while the
GPU computes. The K/V of a step is complete before any of its pages leave this process: a step's
completed prompts go to the controller only once that step's CUDA event has passed, and before
any message that can take pages away (an abort, a hand-over, a shutdown) the step in flight is
finished first (`settle`), since their next writer is another process on another stream.
"""

from semipd.shared import protocol
from semipd.shared.steps import PrefillLaunch, launch_prefill
from semipd.shared.scheduler import PrefillScheduler
from semipd.services.worker import StepTimer, Worker, to_state

IDLE_POLL_MS = 100
BLOCKED_POLL_MS = 5  # prompts wait for decode to free pages


def run(worker: Worker) -> None:
    init, link, allocator = worker.init, worker.link, worker.allocator
    sched = PrefillScheduler(allocator, init.page_size, init.max_batched_tokens, init.max_num_seqs)
    timer = StepTimer(link, worker.runner)
    inflight: PrefillLaunch | None = None
    blocked = False

    def settle(newer_launched: bool = False) -> None:
        """Finish the step in flight: wait for its event, send its completed prompts."""
        nonlocal inflight
        if inflight is not None:
            ready, inflight = inflight.finish(sched, allocator, settled=not newer_launched), None
            if ready:
                link.send(protocol.PrefillDone([to_state(s) for s in ready], [s.finish_reason for s in ready]))

    while True:
        idle = IDLE_POLL_MS if not sched.waiting else BLOCKED_POLL_MS if blocked else 0
        if not worker.apply_messages(0 if inflight is not None else idle, sched, settle=settle):
            settle()
            return
        timer.start()
        chunks = sched.schedule(settled=inflight is None)
        blocked = not chunks
        launched = launch_prefill(worker.runner, sched, chunks) if chunks else None
        settle(newer_launched=launched is not None)  # the step before, while this one runs
        inflight = launched
        if chunks:
            timer.stop(len(chunks))
