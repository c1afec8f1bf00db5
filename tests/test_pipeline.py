"""The step pipeline on the CPU: tokens in flight, the feed, pages held while a step may write
them, and a step in flight handed over to a successor."""

import os

from semipd.shared import protocol
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.steps import mixed_step
from semipd.shared.page_allocator import releasing
from semipd.shared.pipeline import StepPipeline
from semipd.shared.scheduler import DecodeScheduler
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import Sequence
from semipd.services.worker import to_state


def test_tokens_in_flight_feed_and_deferred_pages():
    engine = Engine(EngineConfig(model="tiny", progress=False))
    try:
        sched, allocator = engine.sched, engine.allocator
        seqs = [Sequence(i, [1, 2, 3 + i], SamplingParams(temperature=0, max_tokens=4)) for i in range(2)]
        for seq in seqs:
            sched.add(seq)
        pipeline = StepPipeline(engine.runner, allocator, lambda: sched.decode.running)

        assert mixed_step(engine.runner, sched, pipeline) == []  # the prefill is launched, not read
        # each first token is in flight: counted, not yet on the host
        assert [(s.token_ids, s.num_in_flight, s.num_tokens) for s in seqs] == [([1, 2, 3], 1, 4),
                                                                                ([1, 2, 4], 1, 4)]
        assert pipeline.feed(seqs)[1] == [0, 1]  # each newest token is the in-flight step's row

        free = allocator.num_free()
        pages = allocator.alloc(2, 99)
        pipeline.free(pages)  # the launched step could still write them
        assert allocator.num_free() == free - 2 and allocator.owners()[releasing(os.getpid())] == 2
        read = mixed_step(engine.runner, sched, pipeline)  # launches step 2, reads step 1
        assert [s for s, _ in read] == seqs and all(t >= 0 for _, t in read)
        assert allocator.num_free() == free  # step 1 is done: its pages are safe
        assert [(s.token_ids[-1], s.num_in_flight, s.num_tokens) for s in seqs] == [(t, 1, 5) for _, t in read]

        pipeline.free(allocator.alloc(1, 98))
        assert allocator.num_free() == free - 1  # held for step 2
        assert [t for _, t in pipeline.drain()] == [s.token_ids[-1] for s in seqs]
        assert allocator.num_free() == free and [s.num_in_flight for s in seqs] == [0, 0]
        assert [s.num_tokens for s in seqs] == [5, 5] and [s.num_cached for s in seqs] == [4, 4]
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
        running.num_in_flight = ending.num_in_flight = 1  # in the predecessor's last step, as handed over
        wire = protocol.encode(protocol.HandedOver([to_state(s) for s in (known, running, ending)], True))
        # the tokens in flight are not on the wire, only their count
        assert [(s.token_ids, s.num_in_flight) for s in protocol.decode(wire).seqs] == [
            ([1, 2, 3], 0), ([1, 2, 3], 1), ([1, 2, 3], 1)]
        for seq in (known, running, ending):
            seq.block_table, seq.num_cached = allocator.alloc(1, seq.seq_id), seq.num_tokens - 1
            sched.add(seq)
        assert sorted(s.seq_id for s in sched.held()) == [0, 1, 2]  # a Handover would pass all on
        assert sched.schedule()[0] == [known]  # no token to feed the others yet

        free = allocator.num_free()
        # the last step: sequence 2 finished there (its pages are the predecessor's to free);
        # sequence 7 ended on its way here, so the controller never passed it on
        sched.inherit(protocol.DecodeStep([1, 2, 7], [42, 5, 9], [None, "stop", None]))
        assert running.token_ids == [1, 2, 3, 42] and running.num_in_flight == 0
        assert sched.running == [known, running]
        assert sorted(s.seq_id for s in sched.held()) == [0, 1] and allocator.num_free() == free
        assert sched.schedule()[0] == [known, running]
    finally:
        engine.close()
