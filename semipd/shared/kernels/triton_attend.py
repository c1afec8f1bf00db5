"""Building blocks of the Triton paged-attention kernels (triton_attention.py, triton_decode.py).

Every K/V row is gathered through the block table one token at a time (page = table[pos // page],
row = pos % page), so the kernels' block sizes do not depend on the page size.
Softmax runs in base 2: scores are scaled by scale * log2(e) inside the exponent.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attend(acc, l_i, m_i, q, q_pos, k_base, v_base, table, start, end, qk_scale,
            sk_p, sk_s, sv_p, sv_s, PAGE: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
            CAUSAL: tl.constexpr, BOUND: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of q's rows over kv positions [start, end), BN at a time.
    BOUND: the last block may run past end; CAUSAL: position p is seen only by rows with q_pos >= p."""
    d = tl.arange(0, D)
    for n in range(start, end, BN):
        pos = n + tl.arange(0, BN)
        inside = pos < end
        if BOUND:
            page = tl.load(table + pos // PAGE, mask=inside, other=0)
        else:
            page = tl.load(table + pos // PAGE)
        page = page.to(tl.int64)
        k_ptrs = k_base + (page * sk_p + (pos % PAGE) * sk_s)[:, None] + d[None, :]
        v_ptrs = v_base + (page * sv_p + (pos % PAGE) * sv_s)[:, None] + d[None, :]
        if BOUND:
            k = tl.load(k_ptrs, mask=inside[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if CAUSAL:
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        if BOUND:
            s = tl.where(inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one fused multiply-add per score
        l_i = l_i * alpha + tl.sum(p, 1)
        if BOUND:
            v = tl.load(v_ptrs, mask=inside[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


def precision(dtype: torch.dtype) -> str:
    # tf32 would cost float32 callers ~1e-3 relative error; they exist for exactness.
    return "ieee" if dtype == torch.float32 else "tf32"


def check(q: torch.Tensor, *tensors: torch.Tensor) -> None:
    head_dim = q.shape[-1]
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert all(t.stride(-1) == 1 for t in (q, *tensors)), "the last dimension must be contiguous"

