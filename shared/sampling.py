"""The batched sampler (its parameters are in sampling_params.py).

Randomness is a counter-based hash of (request seed, output index, token id) rather than a
generator's state: a request draws the same noise whatever batch it is in, and after preemption
and recomputation it samples the same tokens again. Sampling is the Gumbel-max trick, so one
argmax over (logits / T + noise) picks a token with softmax(logits / T) probabilities.
"""

import math

import torch

_MASK32 = 0xFFFFFFFF


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
