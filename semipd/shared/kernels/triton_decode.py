"""Triton split-KV decode attention: one query row per sequence, its kv range split across
programs so that small batches still fill the GPU, the splits merged by a second kernel.

With cu_seqlens (RAGGED) the same kernels serve the single-row sequences of a prefill step (the
decode rows of a mixed step), reading and writing their row of the step's packed queries.
"""

import functools

import torch
import triton
import triton.language as tl

from semipd.shared.kernels.triton_attend import LOG2E, attend, precision


@triton.jit(do_not_specialize=["s_table"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, part_ptr, lse_ptr, kv_len_ptr, table_ptr, cu_ptr, qk_scale,
                         sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_table,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr,
                         D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, RAGGED: tl.constexpr):
    """One split of one sequence's kv range for all GROUP query heads of one kv head. RAGGED:
    the queries of a prefill step, where only sequences of one query row are this kernel's."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if RAGGED:  # sequence b's query row, if it has exactly one
        q_row = tl.load(cu_ptr + b)
        if tl.load(cu_ptr + b + 1) - q_row != 1:
            return
    else:
        q_row = b
    kv_len = tl.load(kv_len_ptr + b)
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BN) * BN
    start = split * per_split
    end = tl.minimum(start + per_split, kv_len)
    g = tl.arange(0, G_PAD)
    heads = kvh * GROUP + g
    real = g < GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + q_row * sq_b + heads[:, None] * sq_h + d[None, :], mask=real[:, None], other=0.0)
    acc = tl.zeros([G_PAD, D], tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    acc, l_i, m_i = attend(acc, l_i, m_i, q, None, k_ptr + kvh * sk_h, v_ptr + kvh * sv_h,
                            table_ptr + b.to(tl.int64) * s_table, start, end, qk_scale,
                            sk_p, sk_s, sv_p, sv_s, PAGE, BN, D, False, True, PREC)
    # An empty split (start >= end, e.g. kv_len 0) writes zeros and lse -inf: it weighs nothing.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
    tl.store(part_ptr + row[:, None] * D + d[None, :], out, mask=real[:, None])
    tl.store(lse_ptr + row, lse, mask=real)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_ptr, lse_ptr, o_ptr, cu_ptr, so_b, so_h, num_splits,
                          S_BLOCK: tl.constexpr, D: tl.constexpr, RAGGED: tl.constexpr):
    """Merge one (sequence, head)'s splits, S_BLOCK at a time: the largest lse first, then the
    weighted sum (a fixed block, so that no split count needs a variant of its own)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if RAGGED:
        o_row = tl.load(cu_ptr + b)
        if tl.load(cu_ptr + b + 1) - o_row != 1:
            return
    else:
        o_row = b
    d = tl.arange(0, D)
    first = (b * tl.num_programs(1) + h) * num_splits
    m = tl.full([S_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, S_BLOCK):
        s = s0 + tl.arange(0, S_BLOCK)
        m = tl.maximum(m, tl.load(lse_ptr + first + s, mask=s < num_splits, other=float("-inf")))
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all -inf (kv_len 0): weights 0
    total = tl.zeros([S_BLOCK], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, num_splits, S_BLOCK):
        s = s0 + tl.arange(0, S_BLOCK)
        inside = s < num_splits
        w = tl.exp2(tl.load(lse_ptr + first + s, mask=inside, other=float("-inf")) - m_max)
        part = tl.load(part_ptr + (first + s)[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        total += w
        acc += tl.sum(w[:, None] * part, 0)
    total_sum = tl.sum(total, 0)
    out = acc / tl.where(total_sum > 0, total_sum, 1.0)
    tl.store(o_ptr + o_row * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))


def _decode_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """BLOCK_N, num_warps, num_stages."""
    if dtype == torch.float32:
        return 32, 8, 2
    return (64, 4, 3) if head_dim <= 128 else (32, 4, 2)


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, num_kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """From shapes only (CUDA-graph safe): about four programs per SM, no more splits than blocks."""
    wanted = triton.cdiv(4 * _sm_count(device), batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(capacity, block_n)))


def decode_into(q, k_cache, v_cache, kv_lens, block_tables, scale, out, cu_seqlens_q) -> None:
    """Split-KV attention of one query row per sequence into out: row b, or with cu_seqlens_q
    row cu_seqlens_q[b] of the sequences that have exactly one."""
    batch, (num_heads, head_dim) = kv_lens.shape[0], q.shape[1:]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_n, warps, stages = _decode_config(q.dtype, head_dim)
    splits = _num_splits(batch, num_kv_heads, block_tables.shape[1] * page_size, block_n, q.device)
    part = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    ragged = cu_seqlens_q is not None
    cu_seqlens_q = cu_seqlens_q if ragged else kv_lens  # a pointer the kernels then never read
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, part, lse, kv_lens, block_tables, cu_seqlens_q, scale * LOG2E,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), PAGE=page_size, D=head_dim,
        BN=block_n, PREC=precision(q.dtype), RAGGED=ragged, num_warps=warps, num_stages=stages)
    _decode_reduce_kernel[(batch, num_heads)](
        part, lse, out, cu_seqlens_q, out.stride(0), out.stride(1), splits,
        S_BLOCK=16, D=head_dim, RAGGED=ragged)
