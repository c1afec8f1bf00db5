"""Triton kernels for the CUDA side of shared/ops.py (same signatures, same function).

Each op is one launch whose grid depends on shapes only, so all are CUDA-graph capturable.
Intermediates are rounded to the input dtype where the torch path rounds them, so the two paths
differ only by float32 rounding (an occasional last-bit flip in bfloat16).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, sx, sr, so, sro, n, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * sr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * sro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x32 * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, sx, so, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * sx + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


@triton.jit
def _rotate(x_ptr, o_ptr, sx_h, so_h, cos, sin, d, d_mask, H: tl.constexpr, BLOCK_H: tl.constexpr,
            HALF: tl.constexpr):
    """Rotate the H heads of one token: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < H) & d_mask
    x_ptrs = x_ptr + h * sx_h + d
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = o_ptr + h * so_h + d
    dtype = o_ptr.dtype.element_ty
    tl.store(o_ptrs, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(o_ptrs + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
                 sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h, s_cos,
                 HQ: tl.constexpr, HK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """All q and k heads of one token, so its cos/sin row is read once."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_mask = d < HALF
    cos = tl.load(cos_ptr + pos * s_cos + d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * s_cos + d, mask=d_mask, other=0.0)
    _rotate(q_ptr + t * sq_t, qo_ptr + t * sqo_t, sq_h, sqo_h, cos, sin, d, d_mask, HQ, BLOCK_HQ, HALF)
    _rotate(k_ptr + t * sk_t, ko_ptr + t * sko_t, sk_h, sko_h, cos, sin, d, d_mask, HK, BLOCK_HK, HALF)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape, n = x.shape, x.shape[-1]
    x = _last_dim_contiguous(x.reshape(-1, n))
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is None:
        res, res_out = x, x  # not read or written
    else:
        res = _last_dim_contiguous(residual.reshape(-1, n))
        res_out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
        n, eps, HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out.view(shape), res_out.view(shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x = _last_dim_contiguous(x)
    t, d = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(t, triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d, BLOCK=block)
    return out


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    tokens, hq, head_dim = q.shape
    hk = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = head_dim // 2
    _rope_kernel[(tokens,)](
        q, k, q_out, k_out, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
        HQ=hq, HK=hk, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        HALF=half, BLOCK_D=triton.next_power_of_2(half))
    return q_out, k_out
