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


def row_hash(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] int64 holding each row's 32-bit noise key, from (seed, output index)."""
    folded = (seeds ^ (seeds >> 32)) & _MASK32
    return _fmix32(_fmix32(folded) ^ ((steps * 0x9E3779B9) & _MASK32))


def uniform_noise(row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] floats in (0, 1), a pure function of (row key, token id)."""
    ids = torch.arange(vocab_size, device=row.device, dtype=torch.int64)
    h = _fmix32(_fmix32(row[:, None] ^ ids[None, :]) ^ row[:, None])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
           sorted_rows: list[int] | None = None) -> torch.Tensor:
    """Next token per row of logits [B, V] (float32); all parameters are [B] tensors. Rows with
    top-k or top-p sort their logits; the rest (greedy, temperature, min-p) need no sort. A caller
    that knows those rows passes them (`sorted_rows`): finding them here waits for the GPU."""
    keys = row_hash(seeds, steps)
    if logits.is_cuda:
        from semipd.shared.kernels.triton_sampling import gumbel_max as fused_gumbel_max
        tokens = fused_gumbel_max(logits, temperature, min_p, keys)
    else:
        tokens = gumbel_max(logits, temperature, min_p, keys)
    if sorted_rows is None:
        rows = ((temperature > 0) & ((top_k > 0) | (top_p < 1))).nonzero().squeeze(1)
    elif not sorted_rows:  # the usual decode step: no copy to make
        return tokens
    else:
        rows = torch.tensor(sorted_rows, dtype=torch.int64, pin_memory=logits.is_cuda).to(logits.device,
                                                                                         non_blocking=True)
    if rows.numel():
        tokens[rows] = _sample_sorted(logits[rows], temperature[rows], top_k[rows], top_p[rows],
                                      min_p[rows], keys[rows])
    return tokens


def gumbel_max(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
    """Greedy rows (temperature 0) take the argmax; the others argmax(logits / T + Gumbel noise)
    over the tokens with p >= min_p * p_max."""
    tokens = logits.argmax(dim=-1)
    rows = (temperature > 0).nonzero().squeeze(1)
    if rows.numel():
        scaled = logits[rows] / temperature[rows, None]
        keep = scaled >= scaled.max(dim=-1, keepdim=True).values + min_p[rows, None].log()
        tokens[rows] = (scaled + _gumbel(keys[rows], logits.shape[1])).masked_fill(~keep, -math.inf).argmax(-1)
    return tokens


def _sample_sorted(logits, temperature, top_k, top_p, min_p, keys) -> torch.Tensor:
    scaled, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    gumbel = _gumbel(keys, logits.shape[1]).gather(1, order)
    rank = torch.arange(scaled.shape[1], device=scaled.device)[None, :]
    scaled = scaled.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), -math.inf)
    probs = scaled.softmax(dim=-1)  # renormalized after top-k, as HF and vLLM do
    drop = (probs.cumsum(-1) - probs > top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    return order.gather(1, (scaled + gumbel).masked_fill(drop, -math.inf).argmax(-1, keepdim=True)).squeeze(1)


def _gumbel(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(keys, vocab_size)))
