"""The step pipeline on the CPU: placeholders, the feed, and pages held while a step may write them."""

from shared.engine import Engine, EngineConfig, mixed_step
from shared.page_allocator import RELEASING
from shared.pipeline import StepPipeline
from shared.sampling_params import SamplingParams
from shared.sequence import PENDING, Sequence


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
        assert allocator.num_free() == free - 2 and allocator.owners()[RELEASING] == 2
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
