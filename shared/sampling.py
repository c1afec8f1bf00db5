"""Sampling parameters and the batched sampler.

Randomness is a counter-based hash of (request seed, output index, token id) rather than a
generator's state: a request draws the same noise whatever batch it is in, and after preemption
and recomputation it samples the same tokens again. Sampling is the Gumbel-max trick, so one
argmax over (logits / T + noise) picks a token with softmax(logits / T) probabilities.
"""

import math
import random
from dataclasses import dataclass, field

import torch

from shared.errors import UserError

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 means greedy
    top_k: int = 0                  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None         # None: a random seed is drawn per request
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        """Raise UserError naming the first bad field."""
        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or v > hi or (lo_open and v == lo):
                interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise UserError(f"{name} must be a number in {interval}, got {v!r}")

        def integer(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        integer("top_k", -1, vocab_size)
        integer("max_tokens", 1, 2**31 - 1)
        if self.seed is not None:
            integer("seed", 0, 2**63 - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise UserError(f"stop must be a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                for t in self.stop_token_ids):
            raise UserError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise UserError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    def resolved_seed(self) -> int:
        return random.getrandbits(63) if self.seed is None else self.seed


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] floats in (0, 1), a pure function of (seed, step, token id)."""
    folded = (seeds ^ (seeds >> 32)) & _MASK32
    row = _fmix32(_fmix32(folded) ^ ((steps * 0x9E3779B9) & _MASK32))
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _fmix32(_fmix32(row[:, None] ^ ids[None, :]) ^ row[:, None])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Next token per row of logits [B, V] (float32); all parameters are [B] tensors."""
    tokens = logits.argmax(dim=-1)
    rows = (temperature > 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return tokens
    scaled = logits[rows] / temperature[rows, None]
    gumbel = -torch.log(-torch.log(uniform_noise(seeds[rows], steps[rows], logits.shape[1])))
    k, p, m = top_k[rows], top_p[rows], min_p[rows]
    if bool(((k > 0) | (p < 1)).any()):
        scaled, order = scaled.sort(dim=-1, descending=True)
        gumbel = gumbel.gather(1, order)
        rank = torch.arange(scaled.shape[1], device=scaled.device)[None, :]
        scaled = scaled.masked_fill((k[:, None] > 0) & (rank >= k[:, None]), -math.inf)
        probs = scaled.softmax(dim=-1)  # renormalized after top-k, as HF and vLLM do
        drop = (probs.cumsum(-1) - probs > p[:, None]) | (probs < m[:, None] * probs[:, :1])
        choice = order.gather(1, (scaled + gumbel).masked_fill(drop, -math.inf).argmax(-1, keepdim=True))
    else:
        probs = scaled.softmax(dim=-1)
        drop = probs < m[:, None] * probs.max(dim=-1, keepdim=True).values
        choice = (scaled + gumbel).masked_fill(drop, -math.inf).argmax(-1, keepdim=True)
    tokens[rows] = choice.squeeze(1)
    return tokens
