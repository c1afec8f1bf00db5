"""Tensor parallelism on the CPU: two ranks over gloo give the greedy tokens of one process, on
the `tiny` preset (random weights drawn whole on every rank, then cut) and on transformers
checkpoints (Llama: one of its two KV heads per rank; Qwen2: its one KV head on both ranks, tied
embeddings, q/k/v biases), through Engine's prefill and decode steps, chunked prefill and
preemption included. The ranks run in two spawned processes, once for every case. Each rank's
weights are its cut of the whole model's, a GGUF file's included."""

import json
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.loader import build_model, load_model, load_ranks, weight_layout
from semipd.shared.parallel.group import TPGroup
from semipd.shared.parallel.partition import Partition
from semipd.shared.shared_memory import SharedArena
from tests.conftest import make_checkpoint
from tests.test_parity import GREEDY, prompts

# case -> (model: a preset or a checkpoint's architecture, EngineConfig fields)
CASES = {"tiny": ("tiny", {}), "tiny-chunked-prefill": ("tiny", dict(max_batched_tokens=20)),
         "tiny-pool-preempts": ("tiny", dict(num_pages=5)), "llama": ("llama", {}), "qwen2": ("qwen2", {})}


def greedy(model: str, tp: TPGroup, **kw) -> list[list[int]]:
    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32", progress=False, **kw), tp)
    try:
        return [c.token_ids for c in engine.generate(prompts(), GREEDY)]
    finally:
        engine.close()


def run_rank(rank: int, size: int, folder: str, models: dict[str, str]) -> None:
    """One rank (spawned): every case's greedy tokens, written to rank<r>.json. One thread
    each: two ranks of torch's default width on the cores they share run ten times slower."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    try:
        tp = TPGroup(rank, size, dist.group.WORLD)
        out = {case: greedy(models[model], tp, **kw) for case, (model, kw) in CASES.items()}
    finally:
        dist.destroy_process_group()
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def write_gguf(path: str, vocab=320, hidden=64, inter=128, layers=2, heads=4, kv_heads=2) -> None:
    """A small Llama GGUF file of random float32 weights (no tokenizer: load_model needs none)."""
    w = gguf.GGUFWriter(path, "llama")
    for add, value in [(w.add_context_length, 256), (w.add_embedding_length, hidden), (w.add_block_count, layers),
                       (w.add_feed_forward_length, inter), (w.add_head_count, heads),
                       (w.add_head_count_kv, kv_heads), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_rope_freq_base, 10000.0), (w.add_vocab_size, vocab)]:
        add(value)
    rng = np.random.default_rng(0)
    q, kv = hidden, hidden // heads * kv_heads
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden), "output_norm": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.{n}": s for n, s in [
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (q, hidden)), ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)), ("attn_output", (hidden, q)), ("ffn_gate", (inter, hidden)),
            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))]}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """What each case's model name stands for: the preset, a checkpoint's folder, a GGUF file."""
    paths = {arch: tmp_path_factory.mktemp(f"tp-{arch}") for arch in ("llama", "qwen2", "gguf")}
    make_checkpoint(paths["llama"], "llama", sharded=True)
    make_checkpoint(paths["qwen2"], "qwen2")
    write_gguf(str(paths["gguf"] / "tiny.gguf"))
    return {"tiny": "tiny", "llama": str(paths["llama"]), "qwen2": str(paths["qwen2"]),
            "gguf": str(paths["gguf"] / "tiny.gguf")}


@pytest.fixture(scope="module")
def two_ranks(models, tmp_path_factory) -> list[dict[str, list[list[int]]]]:
    """Each rank's tokens of every case, from one run of two gloo ranks."""
    folder = tmp_path_factory.mktemp("tp2")
    mp.spawn(run_rank, args=(2, str(folder), models), nprocs=2)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_give_the_greedy_tokens_of_one(models, two_ranks, case):
    model, kw = CASES[case]
    expected = greedy(models[model], TPGroup(), **kw)
    assert two_ranks[0][case] == two_ranks[1][case] == expected


@pytest.mark.parametrize("model", ["tiny", "llama", "qwen2", "gguf"])
def test_each_rank_holds_its_cut_of_the_whole_weights(models, model):
    """Built and loaded without a process group, as the controller holds every rank's weights,
    one rank at a time or all in one pass over the checkpoint (load_ranks, in shared memory):
    rank r's parameters are its part of the size-1 model's, and only that."""
    cpu, cfg = torch.device("cpu"), ModelConfig.from_hf(load_hf_config(models[model]))
    whole = dict(load_model(models[model], cpu, torch.float32, progress=False).named_parameters())
    sizes = [weight_layout(build_model(cfg, torch.device("meta"), torch.float32, tp=TPGroup(r, 2)))[1] for r in range(2)]
    arenas = [SharedArena.create(n, cpu) for n in sizes]
    try:
        load_ranks(models[model], [cpu, cpu], torch.float32, arenas, progress=False)
        for rank in range(2):
            alone = load_model(models[model], cpu, torch.float32, progress=False, tp=TPGroup(rank, 2))
            in_pass = build_model(cfg, cpu, torch.float32, arenas[rank].tensor, TPGroup(rank, 2))
            for net in (alone, in_pass):
                for name, p in net.named_parameters():
                    assert torch.equal(p, net.partition.take(name, whole[name])), (rank, name)
            assert sum(p.numel() for p in alone.parameters()) < sum(p.numel() for p in whole.values())
    finally:
        for arena in arenas:
            arena.close()


def test_fewer_kv_heads_than_ranks_are_replicated(models):
    """Qwen2's one KV head serves the query heads of both ranks; Llama's two are one per rank.
    Sizes the heads do not split in are refused, saying which count does not divide."""
    qwen2, llama = (ModelConfig.from_hf(load_hf_config(models[m])) for m in ("qwen2", "llama"))
    assert [Partition.of(qwen2, r, 2).kv_heads.start for r in range(2)] == [0, 0]
    assert [Partition.of(llama, r, 2).kv_heads.start for r in range(2)] == [0, 1]
    assert [Partition.of(qwen2, r, 4).heads.start for r in range(4)] == [0, 1, 2, 3]
    with pytest.raises(UserError, match="tensor-parallel size 3 does not divide the model's 4 attention heads"):
        Partition.of(llama, 0, 3)
    with pytest.raises(UserError, match="size 3 is neither a divisor nor a multiple of the model's 2 KV heads"):
        Partition.of(replace(llama, num_heads=12), 0, 3)
