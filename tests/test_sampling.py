"""The batched sampler: each method's effect, seeding, and parameter validation."""

import math

import pytest
import torch

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.sampling import gumbel_max, row_hash, sample, uniform_noise
from semipd.shared.sampling_params import SamplingParams


def run(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=None):
    b = logits.shape[0]
    full = lambda v, dt: torch.full((b,), v, dtype=dt)  # noqa: E731
    seeds = torch.arange(b, dtype=torch.int64) if seeds is None else seeds
    steps = torch.zeros(b, dtype=torch.int64) if steps is None else steps
    return sample(logits, full(temperature, torch.float32), full(top_k, torch.int32),
                  full(top_p, torch.float32), full(min_p, torch.float32), seeds, steps)


def random_logits(b=64, v=1000, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits()
    assert torch.equal(run(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_extreme_filters_reduce_to_greedy(kw):
    logits = random_logits()
    assert torch.equal(run(logits, **kw), logits.argmax(-1))


def test_a_vanishing_temperature_samples_greedily():
    """1e-40 passes validation; dividing the logits by it overflowed, masked every token and
    gave token 0 at each step (with top-k: arbitrary tokens)."""
    engine = Engine(EngineConfig(model="tiny", progress=False, num_pages=64))
    try:
        def tokens(**kw):
            params = SamplingParams(max_tokens=8, ignore_eos=True, seed=1, **kw)  # generate validates
            return engine.generate([[10, 20, 30, 40]], params)[0].token_ids
        greedy = tokens(temperature=0.0)
        assert len(set(greedy)) > 1
        assert tokens(temperature=1e-40) == greedy and tokens(temperature=1e-40, top_k=5) == greedy
    finally:
        engine.close()


def test_same_seed_same_tokens_whatever_the_batch():
    logits = random_logits(b=8)
    seeds = torch.tensor([7, 7, 8, 9, 10, 11, 12, 13])
    together = run(logits, seeds=seeds)
    alone = torch.cat([run(logits[i:i + 1], seeds=seeds[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)
    assert not torch.equal(run(logits, seeds=seeds), run(logits, seeds=seeds + 100))


def test_noise_is_uniform_and_differs_per_step():
    u = uniform_noise(row_hash(torch.tensor([1, 2]), torch.tensor([0, 0])), 200_000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.01
    assert (u[0] != u[1]).float().mean() > 0.99
    again = uniform_noise(row_hash(torch.tensor([1]), torch.tensor([1])), 200_000)
    assert (again[0] != u[0]).float().mean() > 0.99


def frequencies(logits_row, n=20000, **kw):
    logits = logits_row.expand(n, -1).contiguous()
    tokens = run(logits, seeds=torch.arange(n, dtype=torch.int64), **kw)
    return torch.bincount(tokens, minlength=logits.shape[1]).float() / n


def test_temperature_sampling_follows_softmax():
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for t in (0.5, 1.0, 2.0):
        freq = frequencies(row, temperature=t)
        assert torch.allclose(freq, torch.softmax(row / t, -1), atol=0.015), t


def test_top_k_top_p_min_p_keep_only_their_sets():
    row = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(row, -1)
    f = frequencies(row, top_k=3)
    assert f[3:].sum() == 0 and torch.allclose(f[:3], probs[:3] / probs[:3].sum(), atol=0.015)
    # Nucleus 0.7: the smallest prefix whose mass reaches 0.7.
    keep = int((probs.cumsum(0) < 0.7).sum()) + 1
    f = frequencies(row, top_p=0.7)
    assert f[keep:].sum() == 0 and (f[:keep] > 0).all()
    f = frequencies(row, min_p=0.2)
    kept = probs >= 0.2 * probs.max()
    assert f[~kept].sum() == 0 and (f[kept] > 0).all()


def test_mixed_batch_rows_match_their_own_method():
    """Rows with top-k / top-p take the sorted path, the rest do not: each row samples as it would
    in a batch of its own kind."""
    logits = random_logits(b=6)
    f32, i32 = torch.float32, torch.int32
    t = torch.tensor([0.0, 1.0, 0.7, 1.0, 1.3, 1.0], dtype=f32)
    k = torch.tensor([0, 0, 0, 5, 0, 0], dtype=i32)
    p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.8, 1.0], dtype=f32)
    m = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.0], dtype=f32)
    seeds, steps = torch.arange(6, dtype=torch.int64), torch.full((6,), 3, dtype=torch.int64)
    mixed = sample(logits, t, k, p, m, seeds, steps)
    for i in range(6):
        one = [x[i:i + 1] for x in (logits, t, k, p, m, seeds, steps)]
        assert mixed[i] == sample(*one)[0], i
    # the runner names the sorted rows from the host (finding them on the GPU waits for it)
    assert torch.equal(sample(logits, t, k, p, m, seeds, steps, sorted_rows=[3, 4]), mixed)


@pytest.mark.gpu
def test_fused_sampler_matches_the_torch_path():
    """The Triton gumbel-max draws the same tokens as the torch path from the same logits and
    keys, on a vocabulary that is not a multiple of the kernel's block."""
    b, v = 48, 50_021
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(b, v, generator=gen) * 4
    logits[4, 17] = logits[4, 3000] = 100.0  # a tie in a greedy row: the first index wins
    t = torch.rand(b, generator=gen) * 1.5
    t[::4] = 0.0
    m = torch.where(torch.rand(b, generator=gen) < 0.5, torch.rand(b, generator=gen) * 0.3, 0.0)
    keys = row_hash(torch.randint(0, 2 ** 62, (b,), generator=gen), torch.randint(0, 500, (b,), generator=gen))
    from semipd.shared.kernels.triton_sampling import gumbel_max as fused
    got = fused(logits.cuda(), t.cuda(), m.cuda(), keys.cuda()).cpu()
    assert torch.equal(got, gumbel_max(logits, t, m, keys))
    assert got[4] == 17


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", "hot"), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -2), ("top_k", 1.5), ("min_p", 2.0), ("max_tokens", 0),
    ("max_tokens", True), ("seed", -1), ("stop", "x"), ("stop_token_ids", [400]),
    ("ignore_eos", "yes")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value}).validate(vocab_size=300)
