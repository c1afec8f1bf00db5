"""Gumbel-max sampling in one launch: the CUDA side of shared/sampling.py's gumbel_max.

The torch path materialises the noise, its hash stages and the scaled logits as [B, V] tensors:
about thirty passes over B x V int64/float32 elements per decode step, a sizeable part of the
step with Llama-3's 128k vocabulary, more so when decode holds a fraction of the SMs. Here each
row's program streams its logits once (twice with min-p), hashes its noise in registers and keeps
a running best: the same draws from the same (seed, step, token id) hash.
"""

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _gumbel_max_kernel(logits_ptr, stride, temp_ptr, min_p_ptr, row_hash_ptr, out_ptr, vocab,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    t = tl.load(temp_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    greedy = t <= 0
    t_safe = tl.where(greedy, 1.0, t)
    floor = -float("inf")
    if (min_p > 0) & (t > 0):  # keep tokens with p >= min_p * p_max: scaled >= max / t + log(min_p)
        m = -float("inf")
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.max(tl.load(base + cols, mask=cols < vocab, other=-float("inf")), 0))
        floor = m / t_safe + tl.log(min_p)
    h_row = tl.load(row_hash_ptr + row).to(tl.uint32)
    best, best_id = -float("inf"), 0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        scaled = x / t_safe
        h = _fmix32(_fmix32(h_row ^ cols.to(tl.uint32)) ^ h_row)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(greedy, x, scaled - tl.log(-tl.log(u)))
        score = tl.where((cols < vocab) & (scaled >= floor), score, -float("inf"))
        block_best = tl.max(score, 0)
        if block_best > best:  # strictly greater: the first maximum wins, as in torch.argmax
            best, best_id = block_best, start + tl.argmax(score, 0, tie_break_left=True)
    tl.store(out_ptr + row, best_id)


def gumbel_max(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor,
               row_hash: torch.Tensor) -> torch.Tensor:
    """[B] int64 tokens: argmax(logits) where temperature is 0, else argmax(logits / T + Gumbel
    noise) over the tokens min-p keeps. row_hash [B] int64 holds each row's 32-bit noise key."""
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    _gumbel_max_kernel[(batch,)](logits, logits.stride(0), temperature, min_p, row_hash, out, vocab,
                                 BLOCK=BLOCK)
    return out
