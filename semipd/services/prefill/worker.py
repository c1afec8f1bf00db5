"""Prefill loop: take prompts from the controller, compute them in token-budget batches (long
prompts in chunks), sample each first token and hand the sequence back as metadata.

The K/V written here is complete before any of its pages leave this process. Sampling copies the
tokens to the host (`tolist()`), which waits for every kernel queued before it on this process's
stream, the attention layers' cache writes included; decode only learns of a sequence after that.
A step that completes no prompt (a long prompt's chunk) samples nothing, so the loop waits for it:
its pages may leave next, freed on an abort or a short pool or handed over in a switch, and their
next writer is another process on another stream.
"""

from semipd.shared import protocol
from semipd.shared.steps import prefill_step
from semipd.shared.scheduler import PrefillScheduler
from semipd.services.worker import StepTimer, Worker, to_state

IDLE_POLL_MS = 100
BLOCKED_POLL_MS = 5  # prompts wait for decode to free pages


def run(worker: Worker) -> None:
    init, link, allocator = worker.init, worker.link, worker.allocator
    sched = PrefillScheduler(allocator, init.page_size, init.max_batched_tokens, init.max_num_seqs)
    timer = StepTimer(link, worker.runner)
    blocked = False
    while True:
        timeout = IDLE_POLL_MS if not sched.waiting else BLOCKED_POLL_MS if blocked else 0
        if not worker.apply_messages(timeout, sched):
            return
        timer.start()
        chunks = sched.schedule()
        blocked = not chunks
        if chunks:
            ready = prefill_step(worker.runner, sched, allocator, chunks)
            if ready:
                link.send(protocol.PrefillDone([to_state(s) for s in ready], [s.finish_reason for s in ready]))
            else:
                worker.runner.wait()
            timer.stop(len(chunks))
