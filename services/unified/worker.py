"""Unified loop, the baseline mode: one process runs both phases, each step one forward pass
over every running sequence's next token and as many prompt chunks as fit the token budget
(chunked prefill, as vLLM and SGLang do by default). It reports every new token, first tokens
included, in one DecodeStep per step."""

from shared import protocol
from shared.engine import mixed_step
from shared.scheduler import MixedScheduler
from shared.worker import StepTimer, Worker

IDLE_POLL_MS = 100


def run(worker: Worker) -> None:
    init, link = worker.init, worker.link
    sched = MixedScheduler(worker.allocator, init.page_size, init.max_batched_tokens, init.max_num_seqs)
    timer = StepTimer(link, worker.runner)
    while True:
        busy = sched.decode.running or sched.prefill.waiting
        if not worker.apply_messages(0 if busy else IDLE_POLL_MS, sched):
            return
        timer.start()
        seqs = mixed_step(worker.runner, sched)
        if seqs:
            link.send(protocol.DecodeStep([s.seq_id for s in seqs], [s.token_ids[-1] for s in seqs],
                                          [s.finish_reason for s in seqs]))
            timer.stop(len(seqs))
