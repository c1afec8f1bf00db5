"""Speed of the Triton paged-attention kernels on CUDA, each beside its floor.

Llama-3-8B heads (32 query heads, 8 kv heads, head_dim 128), bf16, page size 16, pages shuffled.
Prefill: one causal prompt of n tokens; floor = 4 * Hq * D * n(n+1)/2 FLOP at 800 TFLOP/s.
  torch's fused SDPA on the same prompt held contiguously is printed for comparison.
Decode: batch B, every sequence at context n; floor = K and V bytes read once at 3.0 TB/s.
  Timed per layer inside a CUDA graph over several layers' caches, as the decode step runs it.
Times are triton.testing.do_bench medians (it flushes L2 between runs).

    python3 -m benchmarks.bench_attention [--sweep]   # --sweep also times other block configs
"""

import argparse

import torch
import torch.nn.functional as F
import triton

from semipd.shared.kernels import triton_attention as kernels
from semipd.shared.kernels import triton_decode as decode_kernels

HQ, HKV, D, PAGE = 32, 8, 128, 16
MATMUL_FLOPS, COPY_BYTES = 800e12, 3.0e12
DTYPE = torch.bfloat16


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def paged_cache(batch: int, context: int, head_dim: int = D):
    pages_each = triton.cdiv(context, PAGE)
    perm = torch.randperm(batch * pages_each, device="cuda")
    table = perm.view(batch, pages_each).to(torch.int32)
    shape = (batch * pages_each, PAGE, HKV, head_dim)
    return torch.randn(shape, device="cuda", dtype=DTYPE), torch.randn(shape, device="cuda", dtype=DTYPE), table


def prefill(n: int, head_dim: int = D):
    q = torch.randn(n, HQ, head_dim, device="cuda", dtype=DTYPE)
    k_cache, v_cache, table = paged_cache(1, n, head_dim)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    ms = time_ms(lambda: kernels.prefill_attention(q, k_cache, v_cache, cu, lens, table, head_dim ** -0.5, n))
    floor = 4 * HQ * head_dim * n * (n + 1) / 2 / MATMUL_FLOPS * 1e3
    qd, kd, vd = (torch.randn(1, h, n, head_dim, device="cuda", dtype=DTYPE) for h in (HQ, HKV, HKV))
    sdpa = time_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
    return ms, floor, sdpa


def decode(batch: int, context: int):
    """Per-layer time of a CUDA graph that runs decode over several layers' caches, as a decode
    step does (graphs hide the launch cost; distinct caches keep the KV out of L2)."""
    per_layer = 2 * batch * context * HKV * D * DTYPE.itemsize
    layers = max(2, min(32, (8 << 30) // per_layer))
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    caches = [paged_cache(batch, context) for _ in range(layers)]
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")

    def step():
        for k_cache, v_cache, table in caches:
            kernels.decode_attention(q, k_cache, v_cache, lens, table, D ** -0.5)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = time_ms(graph.replay) / layers
    del graph, caches
    return ms, per_layer / COPY_BYTES * 1e3


def sweep() -> None:
    """Time other block configs on one long prompt and two decode batches."""
    default_prefill = kernels._prefill_config
    for head_dim, cfgs in ((128, [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)]),
                           (64, [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)])):
        for cfg in cfgs:
            kernels._prefill_config = lambda dtype, head_dim, cfg=cfg: cfg
            ms, floor, sdpa = prefill(8192, head_dim)
            print(f"sweep prefill n=8192 D={head_dim} BM,BN,warps,stages={cfg}: {ms:.3f} ms "
                  f"({floor / ms:.0%} of floor rate; torch SDPA {sdpa:.3f} ms)")
    kernels._prefill_config = default_prefill
    default_sms, default_decode = decode_kernels._sm_count, decode_kernels._decode_config
    for cfg in [(64, 4, 3), (128, 4, 3), (64, 8, 3), (32, 4, 3)]:
        for programs_per_sm in (2, 4, 8):
            decode_kernels._decode_config = lambda dtype, head_dim, cfg=cfg: cfg
            decode_kernels._sm_count = lambda device, f=programs_per_sm: default_sms(device) * f // 4
            for batch, context in ((1, 4096), (32, 1024), (32, 4096)):
                ms, floor = decode(batch, context)
                print(f"sweep decode B={batch} n={context} BN,warps,stages={cfg} programs/SM "
                      f"{programs_per_sm}: {ms * 1e3:.1f} us ({floor / ms:.0%} of floor rate)")
    decode_kernels._sm_count = default_sms
    decode_kernels._decode_config = default_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other block configs")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    rows = []
    for n in (1024, 4096, 8192, 16384):
        ms, floor, sdpa = prefill(n)
        tflops = 4 * HQ * D * n * (n + 1) / 2 / ms / 1e9
        rows.append((f"prefill n={n}", ms, floor, f"{tflops:.0f} TFLOP/s, torch SDPA {sdpa:.3f} ms"))
        print(*rows[-1])
    for batch in (1, 32, 128):
        for context in (1024, 4096):
            ms, floor = decode(batch, context)
            gbs = 2 * batch * context * HKV * D * DTYPE.itemsize / ms / 1e6
            rows.append((f"decode B={batch} n={context}", ms, floor, f"{gbs:.0f} GB/s"))
            print(*rows[-1])
    if args.sweep:
        sweep()
    print(f"\n{'case':<22}{'ms':>9}{'floor ms':>10}{'x floor':>9}  rate")
    for name, ms, floor, rate in rows:
        print(f"{name:<22}{ms:>9.4f}{floor:>10.4f}{ms / floor:>9.2f}  {rate}")


if __name__ == "__main__":
    main()
