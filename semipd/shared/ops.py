"""Elementwise and row-wise ops of a decoder layer, each one kernel on CUDA.

On CUDA the Triton kernels in kernels/triton_fused.py run; elsewhere the plain torch code below
runs, whose float32 results tests/test_parity.py holds to those of Hugging Face transformers.
"""

import torch
import torch.nn.functional as F


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x (+ residual); returns (weight * rmsnorm(residual), residual).
    Normalised in float32 and cast back before the weight multiplies, in HF's order."""
    if x.is_cuda:
        from semipd.shared.kernels.triton_fused import add_rms_norm as triton_add_rms_norm
        return triton_add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2d]."""
    if x.is_cuda:
        from semipd.shared.kernels.triton_fused import silu_and_mul as triton_silu_and_mul
        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in the rotate-half layout, in float32, by the angles
    of positions [T]; cos, sin: float32 [max_position, D/2]. Returns new tensors."""
    if q.is_cuda:
        from semipd.shared.kernels.triton_fused import apply_rope as triton_apply_rope
        return triton_apply_rope(q, k, positions, cos, sin)
    cos = cos[positions][:, None, :]
    sin = sin[positions][:, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
