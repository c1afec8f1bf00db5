"""`semipd bench`'s sharing workloads: groups of a shared prefix and multi-turn conversations, as
planned, and run against a tiny server whose prefix cache then reports hits."""

import json

import numpy as np

from semipd.cli.bench.launched import Launched
from semipd.cli.bench.phases import plan, resolve
from semipd.cli.bench.prompts import PREFIX_GROUPS, TURNS, make_prompts, next_turn
from semipd.cli.main import main
from semipd.shared.client import Client


def planned_prompts(workload: str, n: int, max_len: int):
    rng = np.random.default_rng(0)
    phases = resolve(workload, 8.0, n)
    planned, _ = plan(phases, rng, max_len)
    return planned, *make_prompts(planned, phases, rng, np.random.default_rng(1), max_len)


def test_shared_prefix_groups():
    planned, prompts, after = planned_prompts("shared-prefix", 200, 512)
    heads = {tuple(p[:256]) for p in prompts}
    assert len(heads) == PREFIX_GROUPS and after == [None] * 200
    for p, ids in zip(planned, prompts):
        assert len(ids) == 256 + p.input_len and len(ids) + p.output_len <= 512


def test_multi_turn_conversations_extend_their_last_turn():
    planned, prompts, after = planned_prompts("multi-turn", 40, 2048)
    turns = [j for j in after if j is not None]
    assert turns and len(turns) <= 40 - 40 // TURNS
    for i, j in enumerate(after):
        assert len(prompts[i]) + planned[i].output_len <= 2048
        if j is not None:  # the turn before, its answer, a new question
            assert j < i and prompts[i][:len(prompts[j])] == prompts[j]
            assert len(prompts[i]) == len(prompts[j]) + planned[j].output_len + planned[i].input_len


def test_a_turn_is_sent_after_the_turn_before_as_sent_and_its_real_answer():
    planned, prompts, after = planned_prompts("multi-turn", 40, 2048)
    i = next(i for i, j in enumerate(after) if j is not None and after[j] is not None)  # a third turn
    j, k = after[i], after[after[i]]
    sent_k = prompts[k]
    sent_j = next_turn(prompts[j], prompts[k], sent_k, planned[k].output_len, [7] * planned[k].output_len)
    sent_i = next_turn(prompts[i], prompts[j], sent_j, planned[j].output_len, [9, 9])  # an answer cut short
    question_j, question_i = (prompts[x][len(prompts[y]) + planned[y].output_len:] for x, y in ((j, k), (i, j)))
    assert sent_i == prompts[k] + [7] * planned[k].output_len + question_j + [9, 9] + question_i
    # a backend that answers text: the planned stand-in stays
    assert next_turn(prompts[j], prompts[k], sent_k, planned[k].output_len, None) == prompts[j]


def test_sharing_workloads_hit_the_cache_of_a_tiny_server(tmp_path):
    server = Launched("tiny", "tiny", ["--max-model-len", "256", "--page-size", "8"], str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        for workload in ("shared-prefix", "multi-turn"):
            out = tmp_path / f"{workload}.json"
            assert main(["bench", "--address", server.address, "--workload", workload, "--rate", "20",
                         "--num-requests", "24", "--input-len-mean", "12", "--output-len-mean", "6",
                         "--out", str(out)]) == 0
            summary = json.loads(out.read_text())["summary"]
            assert summary["completed"] == 24 and summary["failed"] == 0
            with Client(server.address) as client:
                cache = client.stats()["prefix_cache"]
            assert cache["hit_rate"] > 0.3, (workload, cache)
    finally:
        server.stop()


def test_which_requests_share_follows_the_seed_and_the_ids_do_not():
    """Two runs with one seed: the same requests share a prefix, through different ids."""
    phases, heads = resolve("shared-prefix", 8.0, 100), []
    for ids_seed in (1, 2):
        rng = np.random.default_rng(0)
        planned, _ = plan(phases, rng, 512)
        prompts, _ = make_prompts(planned, phases, rng, np.random.default_rng(ids_seed), 512)
        heads.append([tuple(p[:256]) for p in prompts])
    sharing = [[[a == b for b in run] for a in run] for run in heads]
    assert sharing[0] == sharing[1] and heads[0][0] != heads[1][0]
