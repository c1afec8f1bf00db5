"""Decode loop: continuous batching. Between steps it admits handed-off sequences and drops
aborted ones; each step grows block tables as sequences cross page boundaries (preempting the
youngest when the pool is short), runs one token for the whole batch (a CUDA graph on GPUs) and
reports it in one message."""

from shared import protocol
from shared.engine import decode_step
from shared.scheduler import DecodeScheduler
from shared.worker import StepTimer, Worker, to_state

IDLE_POLL_MS = 100


def run(worker: Worker) -> None:
    init, link, allocator = worker.init, worker.link, worker.allocator
    sched = DecodeScheduler(allocator, init.page_size, init.max_num_seqs)
    timer = StepTimer(link, worker.runner)
    while True:
        if not worker.apply_messages(0 if sched.running else IDLE_POLL_MS, sched):
            return
        if not sched.running:
            continue
        timer.start()
        batch, preempted = sched.schedule()
        if preempted:
            link.send(protocol.Preempted([to_state(s) for s in preempted]))
        if batch:
            decode_step(worker.runner, sched, batch)
            link.send(protocol.DecodeStep([s.seq_id for s in batch], [s.token_ids[-1] for s in batch],
                                          [s.finish_reason for s in batch]))
            timer.stop(len(batch))
