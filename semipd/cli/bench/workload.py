"""What a benchmark sends: arrival times and (input, output) lengths, from a ShareGPT file or
lognormal draws (the package docstring says why these)."""

import json
import math

import numpy as np

from semipd.shared.errors import UserError, first_line

INPUT_RANGE, OUTPUT_RANGE = (4, 2048), (4, 1024)
INPUT_MEAN, OUTPUT_MEAN, SIGMA = 251.0, 203.0, 1.0
CHARS_PER_TOKEN = 4


def arrival_times(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start: the first at 0, then exponential gaps."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))])


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[min(max(X, lo), hi)] for ln X ~ Normal(mu, sigma)."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inside = math.exp(mu + sigma ** 2 / 2) * (_phi(b - sigma) - _phi(a - sigma))
    return lo * _phi(a) + inside + hi * (1.0 - _phi(b))


def lognormal_lengths(mean: float, sigma: float, bounds: tuple[int, int], n: int,
                      rng: np.random.Generator) -> list[int]:
    lo, hi = bounds
    if not lo < mean < hi:
        raise UserError(f"a mean length must lie strictly between {lo} and {hi}, got {mean:g}")
    low, high = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(100):  # the clipped mean grows with mu: bisect
        mu = (low + high) / 2
        low, high = (mu, high) if clipped_lognormal_mean(mu, sigma, lo, hi) < mean else (low, mu)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int).tolist()


def _tokens(text: str, bounds: tuple[int, int]) -> int:
    return min(max(round(len(text) / CHARS_PER_TOKEN), bounds[0]), bounds[1])


def load_sharegpt(path: str) -> list[tuple[int, int]]:
    """(input, output) token estimates of every conversation with a human turn then a gpt reply."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({first_line(e)})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        turns = [t for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)] \
            if isinstance(turns, list) else []
        human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
        reply = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None) \
            if human is not None else None
        if reply is not None:
            pairs.append((_tokens(turns[human]["value"], INPUT_RANGE), _tokens(reply["value"], OUTPUT_RANGE)))
    if not pairs:
        raise UserError(f"{path}: no conversation has a human turn followed by a gpt reply")
    return pairs


def plan_lengths(n: int, rng: np.random.Generator, pool: list[tuple[int, int]] | None = None,
                 input_mean: float = INPUT_MEAN, output_mean: float = OUTPUT_MEAN,
                 max_model_len: int | None = None) -> list[tuple[int, int]]:
    """n (input, output) lengths: a dataset's pairs shuffled (repeated when n is larger), or
    lognormal draws; pairs longer than max_model_len in all are left out."""
    def fits(pair):
        return max_model_len is None or sum(pair) <= max_model_len
    if pool is not None:
        pool = [p for p in pool if fits(p)]
        if not pool:
            raise UserError(f"no conversation in the dataset fits max_model_len {max_model_len}")
        order = rng.permutation(len(pool))
        return [pool[order[i % len(pool)]] for i in range(n)]
    planned = []
    for _ in range(100):
        inputs = lognormal_lengths(input_mean, SIGMA, INPUT_RANGE, n, rng)
        outputs = lognormal_lengths(output_mean, SIGMA, OUTPUT_RANGE, n, rng)
        planned += [p for p in zip(inputs, outputs) if fits(p)]
        if len(planned) >= n:
            return planned[:n]
    raise UserError(f"too few sampled lengths fit max_model_len {max_model_len}")
