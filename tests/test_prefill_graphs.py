"""Prefill steps as CUDA graphs: the packed inputs' padding and alignment (CPU), a replayed graph
against the eager step on the same model and pool (same hidden states, same K/V, nothing written
elsewhere), and eager steps of every size running the kernels the warm-up compiled."""

import itertools

import pytest
import torch

from semipd.shared.kv_cache import allocate_kv_pool
from semipd.shared.loader import load_model
from semipd.shared.model_runner import ModelRunner
from semipd.shared.prefill_graphs import token_buckets
from semipd.shared.prefill_inputs import InputLayout
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import Sequence

PAGE = 16


def sequence(seq_id: int, num_tokens: int, first_page: int, num_cached: int = 0) -> Sequence:
    seq = Sequence(seq_id, torch.randint(0, 256, (num_tokens,)).tolist(), SamplingParams())
    seq.block_table = list(range(first_page, first_page + -(-num_tokens // PAGE)))
    seq.num_cached = num_cached
    return seq


def test_packed_inputs_pad_to_nothing():
    a, b = sequence(0, 20, first_page=5), sequence(1, 40, first_page=9, num_cached=18)
    layout = InputLayout(tokens=64, rows=4)
    inputs = layout.views(layout.pack([(a, 20), (b, 3)], PAGE, [-1, 0], pin=False))
    assert inputs.ids[:23].tolist() == a.token_ids + b.token_ids[18:21]
    assert inputs.positions[:23].tolist() == list(range(20)) + [18, 19, 20]
    assert inputs.slots[:23].tolist() == ([5 * PAGE + i for i in range(16)] + [6 * PAGE + i for i in range(4)]
                                          + [10 * PAGE + 2, 10 * PAGE + 3, 10 * PAGE + 4])
    assert set(inputs.slots[23:].tolist()) == {-1} and set(inputs.ids[23:].tolist()) == {0}
    assert inputs.kv_lens.tolist() == [20, 21, 0, 0]
    assert inputs.cu_seqlens.tolist() == [0, 20, 23, 23, 23]  # padding sequences hold no tokens
    assert inputs.feed_rows.tolist() == [-1, 0, -1, -1]


@pytest.mark.parametrize("tokens, rows", [(21, 1), (22, 1), (21, 2), (22, 3), (2049, 5)])
def test_every_packed_input_starts_on_16_bytes(tokens, rows):
    """Triton compiles a kernel per pattern of its pointers' 16-byte alignment: inputs whose start
    moved with the step's token count made a step of a new parity compile again, mid-serving."""
    a = sequence(0, 21, first_page=5)
    layout = InputLayout(tokens, rows)
    inputs = layout.views(layout.pack([(a, 21)], PAGE, [], pin=False))
    assert all(view.data_ptr() % 16 == 0 for view in vars(inputs).values())
    assert inputs.positions[:21].tolist() == list(range(21)) and inputs.ids[:21].tolist() == a.token_ids
    assert set(inputs.slots[21:].tolist()) <= {-1} and inputs.slots[:21].tolist()[-1] == 6 * PAGE + 4
    assert inputs.kv_lens.tolist() == [21] + [0] * (rows - 1)
    assert inputs.cu_seqlens.tolist() == [0] + [21] * rows
    assert inputs.feed_rows.tolist() == [-1] * rows


def test_buckets_stop_at_the_graph_limit():
    assert token_buckets(300) == [16, 32, 64, 128, 256]
    assert token_buckets(8192)[-3:] == [1536, 1792, 2048]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_the_eager_step(dtype):
    torch.manual_seed(0)
    model = load_model("tiny", torch.device("cuda"), dtype)
    k, v = allocate_kv_pool(model.cfg, 256, PAGE, dtype, torch.device("cuda"))
    model.bind_kv_cache(k.normal_(), v.normal_())  # random, never zeros
    graphs = ModelRunner(model, PAGE, max_model_len=1024, max_num_seqs=8, prefill_graph_tokens=1024)
    eager = ModelRunner(model, PAGE, max_model_len=1024, max_num_seqs=8, cuda_graphs=False)
    before = (k.clone(), v.clone())
    # a whole prompt, a chunk in the middle of one (its first 50 tokens cached), and decode rows
    steps = [[(sequence(0, 300, 0), 300)],
             [(sequence(1, 130, 20, num_cached=50), 70), (sequence(2, 7, 30), 7)],
             [(sequence(3, 600, 40, num_cached=599), 1), (sequence(4, 90, 80, num_cached=89), 1),
              (sequence(5, 200, 90), 200)]]
    for chunks in steps:
        outputs = []
        for runner in (eager, graphs):
            k.copy_(before[0]), v.copy_(before[1])
            outputs.append((runner.prefill_hidden(chunks).clone(), runner.prefill_logits(chunks),
                            k.clone(), v.clone()))
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for want, got in zip(*outputs):
            torch.testing.assert_close(got, want, **tol)
        if dtype == torch.float32:
            assert torch.equal(outputs[0][1].argmax(-1), outputs[1][1].argmax(-1))
        written = sum(n for _, n in chunks)
        changed = (outputs[1][2] != before[0]).flatten(0, 1).any(-1).any(-1).sum().item()  # slots per layer
        assert changed <= written * model.cfg.num_layers  # padding stored no K/V


def compiled_variants() -> dict[str, int]:
    """How many variants of each Triton kernel this process has compiled (Triton 3's per-device
    caches of JITFunction)."""
    from semipd.shared.kernels import triton_attention, triton_fused
    kernels = {name: getattr(module, name) for module in (triton_attention, triton_fused)
               for name in dir(module) if name.endswith("_kernel")}
    return {name: sum(len(cache[0]) for cache in kernel.device_caches.values()) for name, kernel in kernels.items()}


@pytest.mark.gpu
def test_eager_steps_of_any_size_compile_nothing_after_the_warm_up():
    model = load_model("tiny", torch.device("cuda"), torch.bfloat16)
    k, v = allocate_kv_pool(model.cfg, 512, PAGE, torch.bfloat16, torch.device("cuda"))
    model.bind_kv_cache(k.normal_(), v.normal_())
    runner = ModelRunner(model, PAGE, max_model_len=2048, max_num_seqs=8, cuda_graphs=False)  # warms up
    warmed = compiled_variants()
    assert sum(warmed.values()) > 0
    for sizes in [(301,), (302,), (301, 2), (300, 5, 1), (1025, 1024)]:
        first_pages = itertools.accumulate((-(-n // PAGE) for n in sizes[:-1]), initial=0)
        runner.prefill_hidden([(sequence(i, n, page), n) for i, (n, page) in enumerate(zip(sizes, first_pages))])
    torch.cuda.synchronize()
    assert compiled_variants() == warmed
