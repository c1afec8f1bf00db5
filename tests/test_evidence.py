"""The partitioner's evidence (evidence.py) on its own: what a visit bans, and for how long."""

from semipd.services.controller.evidence import LOAD_WINDOWS, Evidence


def settle(evidence: Evidence, here, load) -> None:
    """Decisions at `here` until the load median is `load`."""
    for _ in range(LOAD_WINDOWS):
        evidence.record(here, [], load, 0.0)


def test_a_visit_holds_at_loads_above_one_it_was_seen_at_not_above_parts_of_two():
    """(70, 100) was visited under 16k prompt tokens at 4 req/s and under 6.4k at 16 req/s. At
    10k and 8 req/s neither visit's load is matched in both phases (the first's prompts dropped
    by over the tolerance, the second's requests), though the least of each phase's loads is."""
    evidence = Evidence(window=50)
    settle(evidence, (70, 100), (16000.0, 4.0))
    settle(evidence, (70, 100), (6400.0, 16.0))
    settle(evidence, (60, 100), (10000.0, 8.0))
    assert evidence.allows((60, 100), (70, 100), fresh=True)
    settle(evidence, (60, 100), (17000.0, 17.0))  # above the first visit's: a give may not go there
    assert not evidence.allows((60, 100), (70, 100), fresh=True)
    assert evidence.allows((60, 100), (70, 100), fresh=False)  # a move a miss asks for may
