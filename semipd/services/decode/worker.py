"""Decode loop: continuous batching, each step launched before the previous one is read
(shared/pipeline.py says what that costs and why it pays).

Between steps it admits handed-off sequences and drops aborted ones; each step grows block
tables as sequences cross page boundaries (preempting the youngest when the pool is short, after
reading the step in flight) and reports its tokens in one message. The prefill process allocates
from the same pool, so pages of sequences that leave go back only once no launched step writes
them."""

from semipd.shared import protocol
from semipd.shared.pipeline import StepPipeline
from semipd.shared.scheduler import DecodeScheduler
from semipd.services.worker import StepTimer, Worker, send_tokens, to_state

IDLE_POLL_MS = 100


def run(worker: Worker) -> None:
    init, link, runner = worker.init, worker.link, worker.runner
    pipeline = StepPipeline(runner, worker.allocator, lambda: sched.running)
    sched = DecodeScheduler(worker.allocator, init.page_size, init.max_num_seqs, pipeline.free)
    timer = StepTimer(link, runner)

    def drain() -> None:
        send_tokens(link, sched.finish(pipeline.drain()))

    def busy() -> bool:
        return bool(sched.running) or pipeline.inflight is not None

    while True:
        if not worker.apply_messages(0 if busy() else IDLE_POLL_MS, sched, drain):
            return
        if not busy():
            continue
        timer.start()
        scheduled = sched.schedule(preempt=pipeline.inflight is None)
        if scheduled is None:  # the pool is short: preempting needs every token known
            drain()
            scheduled = sched.schedule()
        batch, preempted = scheduled
        if preempted:
            link.send(protocol.Preempted([to_state(s) for s in preempted]))
        if batch:
            send_tokens(link, sched.finish(pipeline.launch(batch, runner.decode(batch, pipeline.feed(batch)))))
            timer.stop(len(batch))
        else:
            drain()
