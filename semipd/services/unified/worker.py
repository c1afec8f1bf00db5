"""Unified loop, the baseline mode: one process runs both phases, each step one forward pass
over every running sequence's next token and as many prompt chunks as fit the token budget
(chunked prefill, as vLLM and SGLang do by default). Steps are launched one ahead of the host as
in the decode worker (shared/pipeline.py), as SGLang's overlap scheduler does, so that the
baseline does not pay host time semi-PD hides. It reports every new token, first tokens
included, in one DecodeStep per step."""

from semipd.shared.steps import mixed_step
from semipd.shared.pipeline import StepPipeline
from semipd.shared.scheduler import MixedScheduler
from semipd.services.worker import StepTimer, Worker, send_tokens

IDLE_POLL_MS = 100


def run(worker: Worker) -> None:
    init, link = worker.init, worker.link
    sched = MixedScheduler(worker.allocator, init.page_size, init.max_batched_tokens, init.max_num_seqs)
    pipeline = StepPipeline(worker.runner, worker.allocator, lambda: sched.decode.running)
    timer = StepTimer(link, worker.runner)

    def busy() -> bool:
        return bool(sched.decode.running or sched.prefill.waiting) or pipeline.inflight is not None

    while True:
        if not worker.apply_messages(0 if busy() else IDLE_POLL_MS, sched):
            return
        if not busy():
            continue
        timer.start()
        send_tokens(link, mixed_step(worker.runner, sched, pipeline))
        if pipeline.inflight is not None:
            timer.stop(len(pipeline.inflight.seqs))
