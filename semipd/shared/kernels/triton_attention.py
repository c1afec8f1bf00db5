"""Triton paged attention: the CUDA side of shared/attention.py (same signatures, same function).

Every K/V row is gathered through the block table one token at a time (page = table[pos // page],
row = pos % page), so the kernels' block sizes do not depend on the page size.
Softmax runs in base 2: scores are scaled by scale * log2(e) inside the exponent.

Triton compiles a variant of a kernel for each new combination of its integer arguments' traits
(equal to 1, divisible by 16). Arguments that change from step to step (batch size, block-table
width, number of splits) are exempt (do_not_specialize), so that serving never stops for a
compile when a batch of a new shape arrives: one variant per kernel, compiled at warm-up.
"""

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, sk_n, sk_h, sv_n, sv_h,
                     skc_p, skc_s, skc_h, svc_p, svc_s, svc_h,
                     H: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot < 0:
        return
    page = slot // PAGE
    row = slot % PAGE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    keep = h < H
    k = tl.load(k_ptr + i * sk_n + h * sk_h + d, mask=keep)
    v = tl.load(v_ptr + i * sv_n + h * sv_h + d, mask=keep)
    tl.store(kc_ptr + page * skc_p + row * skc_s + h * skc_h + d, k, mask=keep)
    tl.store(vc_ptr + page * svc_p + row * svc_s + h * svc_h + d, v, mask=keep)


@triton.jit
def _attend(acc, l_i, m_i, q, q_pos, k_base, v_base, table, start, end, qk_scale,
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


@triton.jit(do_not_specialize=["batch", "s_table"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, kv_len_ptr, table_ptr, qk_scale, batch,
                    sq_t, sq_h, so_t, so_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_table,
                    GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(0)
    pid = tl.num_programs(1) - 1 - tl.program_id(1)  # the last (heaviest) query blocks go first
    # Sequence b owns the program ids from cu[b] // BM + b on, enough for its query blocks:
    # find the last b whose first id is <= pid (bisection; ids past a sequence's blocks exit).
    lo = pid * 0
    hi = lo + batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        owned = tl.load(cu_ptr + mid) // BM + mid <= pid
        lo = tl.where(owned, mid, lo)
        hi = tl.where(owned, hi, mid)
    q_start = tl.load(cu_ptr + lo)
    q_len = tl.load(cu_ptr + lo + 1) - q_start
    m0 = (pid - q_start // BM - lo) * BM
    if m0 >= q_len:
        return
    kv_len = tl.load(kv_len_ptr + lo)
    rows = m0 + tl.arange(0, BM)
    q_pos = kv_len - q_len + rows
    d = tl.arange(0, D)
    q_rows = (q_start + rows)[:, None]
    q = tl.load(q_ptr + q_rows * sq_t + h * sq_h + d[None, :], mask=(rows < q_len)[:, None], other=0.0)
    kvh = h // GROUP
    k_base = k_ptr + kvh * sk_h
    v_base = v_ptr + kvh * sv_h
    table = table_ptr + lo.to(tl.int64) * s_table
    acc = tl.zeros([BM, D], tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    m_i = tl.full([BM], -1.0e30, tl.float32)  # finite, so a fully masked block gives no NaN
    # Blocks wholly at or before the block's first query position need no mask.
    first_pos = kv_len - q_len + m0
    full_end = (first_pos + 1) // BN * BN
    end = tl.minimum(first_pos + BM, kv_len)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, k_base, v_base, table, 0, full_end, qk_scale,
                            sk_p, sk_s, sv_p, sv_s, PAGE, BN, D, False, False, PREC)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, k_base, v_base, table, full_end, end, qk_scale,
                            sk_p, sk_s, sv_p, sv_s, PAGE, BN, D, True, True, PREC)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows * so_t + h * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows < q_len)[:, None])


@triton.jit(do_not_specialize=["s_table"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, part_ptr, lse_ptr, kv_len_ptr, table_ptr, qk_scale,
                         sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_table,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr,
                         D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One split of one sequence's kv range for all GROUP query heads of one kv head."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    kv_len = tl.load(kv_len_ptr + b)
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BN) * BN
    start = split * per_split
    end = tl.minimum(start + per_split, kv_len)
    g = tl.arange(0, G_PAD)
    heads = kvh * GROUP + g
    real = g < GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=real[:, None], other=0.0)
    acc = tl.zeros([G_PAD, D], tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, None, k_ptr + kvh * sk_h, v_ptr + kvh * sv_h,
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
def _decode_reduce_kernel(part_ptr, lse_ptr, o_ptr, so_b, so_h, num_splits,
                          S_BLOCK: tl.constexpr, D: tl.constexpr):
    """Merge one (sequence, head)'s splits, S_BLOCK at a time: the largest lse first, then the
    weighted sum (a fixed block, so that no split count needs a variant of its own)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
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
    tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))


def _precision(dtype: torch.dtype) -> str:
    # tf32 would cost float32 callers ~1e-3 relative error; they exist for exactness.
    return "ieee" if dtype == torch.float32 else "tf32"


def _prefill_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, num_warps, num_stages."""
    if dtype == torch.float32:  # exact fp32 dots run on FMA units; larger tiles spill registers
        return (64, 32, 8, 2) if head_dim <= 64 else (64, 16, 8, 2)
    if head_dim <= 64:
        return 128, 64, 8, 3
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


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


def _check(q: torch.Tensor, *tensors: torch.Tensor) -> None:
    head_dim = q.shape[-1]
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert all(t.stride(-1) == 1 for t in (q, *tensors)), "the last dimension must be contiguous"


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    n, heads, head_dim = k.shape
    _check(k, v, k_cache, v_cache)
    if n == 0:
        return
    _store_kv_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
                           H=heads, BLOCK_H=triton.next_power_of_2(heads), D=head_dim,
                           PAGE=k_cache.shape[1])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_q_len: int) -> torch.Tensor:
    total_q, num_heads, head_dim = q.shape
    _check(q, k_cache, v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = kv_lens.shape[0]
    block_m, block_n, warps, stages = _prefill_config(q.dtype, head_dim)
    # Enough for any ragged split of total_q (see the kernel), so max_q_len is not needed and the
    # host never reads cu_seqlens_q; the spare programs exit at once.
    programs = total_q // block_m + batch
    if programs == 0:
        return out
    _prefill_kernel[(num_heads, programs)](
        q, k_cache, v_cache, out, cu_seqlens_q, kv_lens, block_tables, scale * _LOG2E, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], PAGE=k_cache.shape[1], D=head_dim, BM=block_m,
        BN=block_n, PREC=_precision(q.dtype), num_warps=warps, num_stages=stages)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    _check(q, k_cache, v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_n, warps, stages = _decode_config(q.dtype, head_dim)
    splits = _num_splits(batch, num_kv_heads, block_tables.shape[1] * page_size, block_n, q.device)
    part = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, part, lse, kv_lens, block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), PAGE=page_size, D=head_dim,
        BN=block_n, PREC=_precision(q.dtype), num_warps=warps, num_stages=stages)
    _decode_reduce_kernel[(batch, num_heads)](
        part, lse, out, out.stride(0), out.stride(1), splits,
        S_BLOCK=16, D=head_dim)
    return out
