"""Paged attention against a float64 reference written here: the torch paths on the CPU and the
Triton kernels on CUDA. Pages are random permutations; every cache slot no sequence owns is NaN."""

import random

import pytest
import torch

from semipd.shared.attention import decode_attention, prefill_attention, store_kv

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def gpu(test):
    """Marked `gpu` and skipped where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reference(q, k, v, q_pos, scale):
    """softmax(q k^T * scale) v in float64 with an explicit causal mask (key j seen if j <= q_pos).
    q [Lq, Hq, D], k/v [L, Hkv, D] dense; an empty key range gives zeros."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    if k.shape[0] == 0:
        return out
    group = q.shape[1] // k.shape[1]
    hidden = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        s = (q[:, h].double() @ kh.T * scale).masked_fill(hidden, float("-inf"))
        p = torch.exp(s - s.max(dim=1, keepdim=True).values)
        out[:, h] = (p / p.sum(dim=1, keepdim=True)) @ vh
    return out


def paged(ks, vs, page_size, device):
    """Scatter each sequence's dense K/V [L, Hkv, D] into randomly chosen pages of NaN caches.
    Table entries past a sequence's pages point at a page nobody writes."""
    counts = [cdiv(k.shape[0], page_size) for k in ks]
    num_pages = sum(counts) + 2
    perm = torch.randperm(num_pages).tolist()
    table = torch.full((len(ks), max(counts) + 1), perm[-1], dtype=torch.int32)
    shape = (num_pages, page_size, *ks[0].shape[1:])
    k_cache = torch.full(shape, float("nan"), dtype=ks[0].dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for b, (k, v) in enumerate(zip(ks, vs)):
        table[b, :counts[b]] = torch.tensor(perm[used:used + counts[b]])
        used += counts[b]
        pos = torch.arange(k.shape[0])
        page, row = table[b, pos // page_size].long().to(device), (pos % page_size).to(device)
        k_cache[page, row] = k
        v_cache[page, row] = v
    return k_cache, v_cache, table.to(device)


def make_batch(q_lens, kv_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device):
    ks = [torch.randn(n, num_kv_heads, head_dim, device=device).to(dtype) for n in kv_lens]
    vs = [torch.randn(n, num_kv_heads, head_dim, device=device).to(dtype) for n in kv_lens]
    k_cache, v_cache, table = paged(ks, vs, page_size, device)
    q = (torch.randn(sum(q_lens), num_heads, head_dim, device=device) * 2).to(dtype)
    return q, ks, vs, k_cache, v_cache, table


def check(out, ref, dtype):
    """Relative L2 error over the whole output and per (token, head) row; an all-zero reference
    row (empty kv range) must come out exactly zero."""
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN or unwritten output"
    diff = out.double() - ref
    total = (diff.norm() / ref.norm()).item()
    worst_row = (diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()
    assert total < TOL[dtype] and worst_row < 4 * TOL[dtype], (total, worst_row)


def poison():
    """Leave NaN in the CUDA caching allocator's free blocks (small and large pools), so that an
    output element a kernel never writes shows up as NaN."""
    if torch.cuda.is_available():
        [torch.full((n,), float("nan"), device="cuda") for n in (1 << 16, 1 << 18, 1 << 24, 1 << 26)]


def random_lengths(rng, num_seqs, page_size, longest, with_prefix):
    """Chunk lengths including 1 and page multiples, each after a prefix of cached tokens."""
    q_lens = [rng.choice([1, page_size, 2 * page_size, rng.randint(1, longest)]) for _ in range(num_seqs)]
    prefixes = [rng.choice([0, page_size, rng.randint(1, longest)]) if with_prefix else 0
                for _ in range(num_seqs)]
    return q_lens, [p + n for p, n in zip(prefixes, q_lens)]


def run_prefill(q_lens, kv_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device):
    q, ks, vs, k_cache, v_cache, table = make_batch(q_lens, kv_lens, num_heads, num_kv_heads, head_dim,
                                                    page_size, dtype, device)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    scale = head_dim ** -0.5
    poison()
    out = prefill_attention(q, k_cache, v_cache, cu.to(device), torch.tensor(kv_lens, dtype=torch.int32,
                            device=device), table, scale, max(q_lens))
    ref = torch.cat([reference(q[cu[b]:cu[b + 1]], ks[b], vs[b],
                               torch.arange(kv_lens[b] - q_lens[b], kv_lens[b], device=device), scale)
                     for b in range(len(q_lens))])
    check(out, ref, dtype)


def run_decode(kv_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device):
    q, ks, vs, k_cache, v_cache, table = make_batch([1] * len(kv_lens), kv_lens, num_heads, num_kv_heads,
                                                    head_dim, page_size, dtype, device)
    scale = head_dim ** -0.5
    poison()
    out = decode_attention(q, k_cache, v_cache, torch.tensor(kv_lens, dtype=torch.int32, device=device),
                           table, scale)
    ref = torch.cat([reference(q[b:b + 1], ks[b], vs[b], torch.tensor([n - 1], device=device), scale)
                     for b, n in enumerate(kv_lens)])
    check(out, ref, dtype)


def run_store(seed, page_size, dtype, device):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_kv_heads, head_dim, n = rng.choice([1, 2, 8]), rng.choice([64, 128]), rng.randint(1, 70)
    # Strided k, v: views into a fused qkv projection, as the model passes them.
    size = num_kv_heads * head_dim
    qkv = torch.randn(n, 3 * size, device=device).to(dtype)
    k, v = qkv[:, size:2 * size].view(n, num_kv_heads, head_dim), qkv[:, 2 * size:].view(n, num_kv_heads, head_dim)
    num_slots = (cdiv(n, page_size) + 3) * page_size
    slots = torch.randperm(num_slots, device=device)[:n]
    slots[torch.rand(n, device=device) < 0.3] = -1
    k_cache = torch.full((num_slots // page_size, page_size, num_kv_heads, head_dim), float("nan"),
                         dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    store_kv(k, v, k_cache, v_cache, slots.to(torch.int32))
    keep = slots >= 0
    flat_k, flat_v = k_cache.view(num_slots, -1), v_cache.view(num_slots, -1)
    assert torch.equal(flat_k[slots[keep]], k[keep].flatten(1))
    assert torch.equal(flat_v[slots[keep]], v[keep].flatten(1))
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


CASES = [(1, 64, 16), (4, 128, 1), (8, 64, 64), (4, 64, 16), (1, 128, 64), (8, 128, 16)]  # group, D, page


def small_prefill(seed, group, head_dim, page_size, with_prefix, dtype, device, num_seqs, longest):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_kv_heads = rng.choice([2, 3])
    q_lens, kv_lens = random_lengths(rng, num_seqs, page_size, longest, with_prefix)
    run_prefill(q_lens, kv_lens, group * num_kv_heads, num_kv_heads, head_dim, page_size, dtype, device)


def small_decode(seed, group, head_dim, page_size, dtype, device, longest):
    """A batch with lengths 1, one and two pages, a random one and a padding row (kv_len 0)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_kv_heads = rng.choice([2, 3])
    kv_lens = [1, page_size, 2 * page_size, rng.randint(1, longest), 0]
    rng.shuffle(kv_lens)
    run_decode(kv_lens, group * num_kv_heads, num_kv_heads, head_dim, page_size, dtype, device)


# CPU: the torch paths of shared/attention.py.

@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_store_kv_cpu(page_size):
    for seed in range(3):
        run_store(seed, page_size, torch.float32, "cpu")


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_prefix", [False, True])
def test_prefill_cpu(case, with_prefix):
    small_prefill(2 * case + with_prefix, *CASES[case], with_prefix, torch.float32, "cpu", 3, 150)


def test_prefill_cpu_bfloat16():
    small_prefill(100, 4, 128, 16, True, torch.bfloat16, "cpu", 3, 150)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_cpu(case):
    small_decode(case, *CASES[case], torch.float32, "cpu", 300)


def test_decode_cpu_bfloat16():
    small_decode(100, 8, 64, 16, torch.bfloat16, "cpu", 300)


# CUDA: the Triton kernels. Llama-3-8B heads: 32 query heads, 8 kv heads, head_dim 128.

DTYPES = [torch.float32, torch.bfloat16]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_store_kv_gpu(page_size, dtype):
    for seed in range(3):
        run_store(seed, page_size, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefill_gpu(case, dtype):
    small_prefill(case, *CASES[case], case % 2 == 0, dtype, "cuda", 6, 700)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_gpu_long(dtype):
    """Up to 32k cached tokens: a chunk after a long prefix, a whole prompt, single tokens."""
    q_lens = [384, 1000, 1, 4096, 1]
    kv_lens = [32768, 1000, 5001, 4096, 1]
    run_prefill(q_lens, kv_lens, 32, 8, 128, 16, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_gpu(case, dtype):
    small_decode(case, *CASES[case], dtype, "cuda", 3000)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_gpu_long(dtype):
    torch.manual_seed(1)
    run_decode([32768, 0, 1, 4097, 16 * 37, 31999], 32, 8, 128, 16, dtype, "cuda")


@gpu
def test_decode_cuda_graph():
    """Capture once, then change the query and the lengths in place: replay matches eager."""
    torch.manual_seed(2)
    batch, capacity, page_size = 8, 2048, 16
    q, ks, vs, k_cache, v_cache, table = make_batch([1] * batch, [capacity] * batch, 32, 8, 128, page_size,
                                                    torch.bfloat16, "cuda")
    lens = torch.full((batch,), capacity, dtype=torch.int32, device="cuda")
    scale = 128 ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, k_cache, v_cache, lens, table, scale)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, lens, table, scale)
    for new_lens in ([1, 0, 2048, 17, 1000, 16, 0, 555], [2048] * batch):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.tensor(new_lens))
        out.fill_(float("nan"))
        graph.replay()
        eager = decode_attention(q, k_cache, v_cache, lens, table, scale)
        assert torch.equal(out, eager)
        ref = torch.cat([reference(q[b:b + 1], ks[b][:n], vs[b][:n], torch.tensor([n - 1], device="cuda"),
                                   scale) for b, n in enumerate(new_lens)])
        check(out, ref, torch.bfloat16)


@gpu
def test_batches_of_new_shapes_compile_nothing():
    """Serving must never stop to compile: once a kernel has run, batches of other sizes and
    block-table widths (1, multiples of 16, others: traits Triton would specialize on) reuse the
    compiled variant in Triton's per-device kernel cache."""
    from semipd.shared.kernels import triton_attention, triton_decode
    jitted = (triton_attention._prefill_kernel, triton_decode._decode_split_kernel, triton_decode._decode_reduce_kernel)

    def variants() -> list[int]:
        return [len(k.device_caches[torch.cuda.current_device()][0]) for k in jitted]

    def run(kv_lens: list[int]) -> None:
        q_lens = [max(1, n // 3) for n in kv_lens]
        q, _, _, k_cache, v_cache, table = make_batch(q_lens, kv_lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
        lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
        cu = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
        prefill_attention(q, k_cache, v_cache, cu, lens, table, 128 ** -0.5, max(q_lens))
        decode_attention(q[:len(kv_lens)].contiguous(), k_cache, v_cache, lens, table, 128 ** -0.5)

    torch.manual_seed(3)
    run([40, 7])
    before = variants()
    for kv_lens in ([5], [16 * 15], [16 * 47 + 3], [100] * 16, [33] * 17, [16 * 31, 1, 900, 2000]):
        run(kv_lens)
    assert variants() == before, (before, variants())
