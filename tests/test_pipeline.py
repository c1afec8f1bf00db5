"""The step pipeline on the CPU: placeholders, the feed, pages held while a step may write them,
and a step in flight handed over to a successor."""

import os

from semipd.shared import protocol
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.steps import mixed_step
from semipd.shared.page_allocator import releasing
from semipd.shared.pipeline import StepPipeline
from semipd.shared.scheduler import DecodeScheduler
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import PENDING, Sequence


def test_placeholders_feed_and_deferred_pages():
    engine = Engine(EngineConfig(model="tiny", progress=False))
    try:
        sched, allocator = engine.sched, engine.allocator
        seqs = [Sequence(i, [1, 2, 3 + i], SamplingParams(temperature=0, max_tokens=4)) for i in range(2)]
        for seq in seqs:
            sched.add(seq)
        pipeline = StepPipeline(engine.runner, allocator, lambda: sched.decode.running)

        assert mixed_step(engine.runner, sched, pipeline) == []  # the prefill is launched, not read
        assert [s.token_ids[-1] for s in seqs] == [PENDING, PENDING]
        assert pipeline.feed(seqs)[1] == [0, 1]  # each newest token is the in-flight step's row

        free = allocator.num_free()
        pages = allocator.alloc(2, 99)
        pipeline.free(pages)  # the launched step could still write them
        assert allocator.num_free() == free - 2 and allocator.owners()[releasing(os.getpid())] == 2
        read = mixed_step(engine.runner, sched, pipeline)  # launches step 2, reads step 1
        assert [s for s, _ in read] == seqs and all(t >= 0 for _, t in read)
        assert allocator.num_free() == free  # step 1 is done: its pages are safe
        assert [s.token_ids[-2:] for s in seqs] == [[t, PENDING] for _, t in read]

        pipeline.free(allocator.alloc(1, 98))
        assert allocator.num_free() == free - 1  # held for step 2
        assert [t for _, t in pipeline.drain()] == [s.token_ids[-1] for s in seqs]
        assert allocator.num_free() == free and not any(PENDING in s.token_ids for s in seqs)
        pipeline.free(allocator.alloc(1, 97))  # nothing in flight: back at once
        assert allocator.num_free() == free
    finally:
        engine.close()


def test_a_successor_holds_the_sequences_of_a_step_in_flight_until_it_is_passed_on():
    engine = Engine(EngineConfig(model="tiny", progress=False))
    try:
        allocator = engine.allocator
        sched = DecodeScheduler(allocator, engine.config.page_size, max_num_seqs=8)
        params = SamplingParams(temperature=0, max_tokens=10)
        known, running, ending = (Sequence(i, [1, 2, 3], params) for i in range(3))
        running.token_ids.append(PENDING)  # in the predecessor's last step, as handed over
        ending.token_ids.append(PENDING)
        for seq in (known, running, ending):
            seq.block_table, seq.num_cached = allocator.alloc(1, seq.seq_id), 3
            sched.add(seq)
        assert sorted(s.seq_id for s in sched.held()) == [0, 1, 2]  # a Handover would pass all on
        assert sched.schedule()[0] == [known]  # no token to feed the others yet

        free = allocator.num_free()
        # the last step: sequence 2 finished there (its pages are the predecessor's to free);
        # sequence 7 ended on its way here, so the controller never passed it on
        sched.inherit(protocol.DecodeStep([1, 2, 7], [42, 5, 9], [None, "stop", None]))
        assert running.token_ids == [1, 2, 3, 42] and sched.running == [known, running]
        assert sorted(s.seq_id for s in sched.held()) == [0, 1] and allocator.num_free() == free
        assert sched.schedule()[0] == [known, running]
    finally:
        engine.close()
