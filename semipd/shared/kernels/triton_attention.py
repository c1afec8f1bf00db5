"""Triton paged attention: the CUDA side of shared/attention.py (same signatures, same function):
the K/V store and the prefill kernel here, the decode kernels in triton_decode.py, their shared
inner loop in triton_attend.py.

Triton compiles a variant of a kernel for each new combination of its integer arguments' traits
(equal to 1, divisible by 16). Arguments that change from step to step (batch size, block-table
width, number of splits) are exempt (do_not_specialize), so that serving never stops for a
compile when a batch of a new shape arrives: one variant per kernel, compiled at warm-up.
"""

import torch
import triton
import triton.language as tl

from semipd.shared.kernels.triton_attend import LOG2E, attend, check, precision
from semipd.shared.kernels.triton_decode import decode_into


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
    if (m0 >= q_len) | (q_len == 1):  # a single query row is the decode kernels' (prefill_attention)
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
    acc, l_i, m_i = attend(acc, l_i, m_i, q, q_pos, k_base, v_base, table, 0, full_end, qk_scale,
                            sk_p, sk_s, sv_p, sv_s, PAGE, BN, D, False, False, PREC)
    acc, l_i, m_i = attend(acc, l_i, m_i, q, q_pos, k_base, v_base, table, full_end, end, qk_scale,
                            sk_p, sk_s, sv_p, sv_s, PAGE, BN, D, True, True, PREC)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows * so_t + h * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows < q_len)[:, None])


def _prefill_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, num_warps, num_stages."""
    if dtype == torch.float32:  # exact fp32 dots run on FMA units; larger tiles spill registers
        return (64, 32, 8, 2) if head_dim <= 64 else (64, 16, 8, 2)
    if head_dim <= 64:
        return 128, 64, 8, 3
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    n, heads, head_dim = k.shape
    check(k, v, k_cache, v_cache)
    if n == 0:
        return
    _store_kv_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
                           H=heads, BLOCK_H=triton.next_power_of_2(heads), D=head_dim,
                           PAGE=k_cache.shape[1])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_q_len: int) -> torch.Tensor:
    """Sequences of several query rows run in the prefill kernel, tiled BLOCK_M rows at a time;
    those of one row (decode rows of a mixed step) in the decode kernels, which would otherwise
    spend a whole BLOCK_M tile on that row. Grids depend on shapes only (CUDA-graph safe)."""
    total_q, num_heads, head_dim = q.shape
    check(q, k_cache, v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = kv_lens.shape[0]
    if total_q == 0:
        return out
    block_m, block_n, warps, stages = _prefill_config(q.dtype, head_dim)
    # Enough for any ragged split of total_q (see the kernel), so max_q_len is not needed and the
    # host never reads cu_seqlens_q; the spare programs exit at once.
    _prefill_kernel[(num_heads, total_q // block_m + batch)](
        q, k_cache, v_cache, out, cu_seqlens_q, kv_lens, block_tables, scale * LOG2E, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], PAGE=k_cache.shape[1], D=head_dim, BM=block_m,
        BN=block_n, PREC=precision(q.dtype), num_warps=warps, num_stages=stages)
    decode_into(q, k_cache, v_cache, kv_lens, block_tables, scale, out, cu_seqlens_q)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    check(q, k_cache, v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] > 0:
        decode_into(q, k_cache, v_cache, kv_lens, block_tables, scale, out, None)
    return out
