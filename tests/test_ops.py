"""The fused ops against float64 references written here: the torch paths on the CPU, and the
Triton kernels on CUDA (also against the torch path, run on CPU copies of the same inputs)."""

import random

import pytest
import torch

from semipd.shared.ops import add_rms_norm, apply_rope, silu_and_mul
from semipd.shared.rope import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]
# (rtol, atol) per element: float32 allows a few roundings, bfloat16 about three (2^-9 each).
TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
MAX_POSITION = 4096


def close(out, ref, dtype):
    assert out.dtype == dtype and torch.isfinite(out).all(), "wrong dtype, NaN or unwritten output"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol)


def ref_add_rms_norm(x, residual, weight, eps):
    h = x.double() if residual is None else x.double() + residual.double()
    return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), h


def ref_silu_and_mul(x):
    gate, up = x.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def ref_rope(x, positions, cos, sin):
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[positions][:, None], sin.double()[positions][:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def run_add_rms_norm(seed, dtype, device, sizes):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokens, n, eps = rng.randint(1, 70), rng.choice(sizes), rng.choice([1e-5, 1e-6])
    x = torch.randn(tokens, n, device=device).to(dtype)
    weight = (1 + 0.5 * torch.randn(n, device=device)).to(dtype)
    for residual in (None, (3 * torch.randn(tokens, n, device=device)).to(dtype)):
        normed, res = add_rms_norm(x, residual, weight, eps)
        ref_normed, ref_res = ref_add_rms_norm(x, residual, weight, eps)
        close(normed, ref_normed, dtype)
        close(res, ref_res, dtype)
        if device != "cpu":
            torch_normed, torch_res = add_rms_norm(*cpu(x, residual, weight), eps)
            close(normed.cpu(), torch_normed, dtype)
            assert torch.equal(res.cpu(), torch_res)  # one rounding of the same float32 sum


def run_silu_and_mul(seed, dtype, device, sizes):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    x = (3 * torch.randn(rng.randint(1, 70), 2 * rng.choice(sizes), device=device)).to(dtype)
    out = silu_and_mul(x)
    close(out, ref_silu_and_mul(x), dtype)
    if device != "cpu":
        close(out.cpu(), silu_and_mul(x.cpu()), dtype)


def run_apply_rope(seed, dtype, device, head_dims):
    """q and k are views into a fused qkv output, as the model passes them."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokens, num_kv_heads, head_dim = rng.randint(1, 70), rng.choice([1, 2, 3, 8]), rng.choice(head_dims)
    num_heads = num_kv_heads * rng.choice([1, 2, 4])
    rope = RotaryEmbedding(head_dim, MAX_POSITION, rng.choice([1e4, 5e5]), None).to(device)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITION, (tokens,), device=device)
    before = qkv.clone()
    q_out, k_out = apply_rope(q, k, positions, rope.cos, rope.sin)
    assert torch.equal(qkv, before), "inputs modified"
    close(q_out, ref_rope(q, positions, rope.cos, rope.sin), dtype)
    close(k_out, ref_rope(k, positions, rope.cos, rope.sin), dtype)
    if device != "cpu":
        torch_q, torch_k = apply_rope(*cpu(q, k, positions, rope.cos, rope.sin))
        close(q_out.cpu(), torch_q, dtype)
        close(k_out.cpu(), torch_k, dtype)


# CPU: the torch paths of shared/ops.py.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_add_rms_norm_cpu(seed, dtype):
    run_add_rms_norm(seed, dtype, "cpu", [64, 100, 1000])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_silu_and_mul_cpu(seed, dtype):
    run_silu_and_mul(seed, dtype, "cpu", [8, 100, 1500])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_apply_rope_cpu(seed, dtype):
    run_apply_rope(seed, dtype, "cpu", [16, 64, 128])


# CUDA: the Triton kernels, with sizes that need masking and Llama-3-8B's (4096, 14336, 128).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_add_rms_norm_gpu(seed, dtype):
    run_add_rms_norm(seed, dtype, "cuda", [64, 100, 1000, 3584, 4096, 8192])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_silu_and_mul_gpu(seed, dtype):
    run_silu_and_mul(seed, dtype, "cuda", [8, 100, 1500, 14336, 18944])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_apply_rope_gpu(seed, dtype):
    run_apply_rope(seed, dtype, "cuda", [16, 64, 80, 128])


@pytest.mark.gpu
def test_ops_cuda_graph():
    """Capture all three ops once, then change the inputs in place: replay matches eager."""
    torch.manual_seed(3)
    tokens, hidden, inter, heads, kv_heads, head_dim = 8, 4096, 14336, 32, 8, 128
    dev, dtype = "cuda", torch.bfloat16
    rope = RotaryEmbedding(head_dim, MAX_POSITION, 5e5, None).to(dev)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=dev, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * inter, device=dev, dtype=dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dtype)
    positions = torch.zeros(tokens, dtype=torch.int64, device=dev)

    def step():
        q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k = apply_rope(q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
                          positions, rope.cos, rope.sin)
        return (*add_rms_norm(x, residual, weight, 1e-5), silu_and_mul(gate_up), q, k)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        for t in (x, residual, weight, gate_up, qkv):
            t.copy_(torch.randn_like(t))
        positions.copy_(torch.randint(0, MAX_POSITION, (tokens,)))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        for got, eager in zip(outs, step()):
            assert torch.equal(got, eager)
