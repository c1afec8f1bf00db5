"""Engine benchmark on a GPU: decode step latency and prefill throughput, each beside its floor.

    python -m benchmarks.bench_engine [--model llama3-8b] [--json out.json]

Decode: one CUDA-graph step for B sequences of C cached tokens. Floor = bytes that must be read
(the weights once, plus B*C tokens of K and V) / the measured copy bandwidth. Reported twice:
the graph replay alone (GPU time) and the whole runner call (host preparation included).
Prefill: one sequence of N tokens, replayed as a CUDA graph (up to 2048 tokens) and eagerly, side
by side, each with the host's time to issue it. Floor = FLOPs executed (linear layers + causal
attention) / the measured bf16 matmul rate.
"""

import argparse
import json
import time

import torch

from benchmarks.common import cuda_time_ms, host_time_ms, measure_ceilings
from semipd.shared.kv_cache import allocate_kv_pool, page_bytes, pages_for
from semipd.shared.loader import load_model
from semipd.shared.model_runner import ModelRunner
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import Sequence

PAGE = 16
DECODE_CASES = [(1, 1024), (1, 4096), (32, 1024), (32, 4096), (128, 1024), (128, 4096)]
PREFILL_LENS = [256, 512, 1024, 2048, 4096, 8192]
MIXED = (64, 1024, 512)  # a unified step: 64 decode rows of 1024 cached tokens beside a 512-token chunk


def linear_flops_per_token(cfg) -> float:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    return 2.0 * cfg.num_layers * per_layer


def attention_flops(cfg, n: int) -> float:
    """QK^T and PV over the causal triangle, all layers."""
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * (n + 1) / 2


def fake_sequences(batch: int, context: int) -> list[Sequence]:
    """Sequences whose first context-1 tokens are (randomly filled) cache, on disjoint pages."""
    seqs, page = [], 0
    for i in range(batch):
        seq = Sequence(i, [1] * context, SamplingParams(temperature=0.0))
        n = pages_for(context, PAGE)
        seq.block_table = list(range(page, page + n))
        seq.num_cached = context - 1
        page += n
        seqs.append(seq)
    return seqs


def decode_and_prompts(model, dtype, batch: int, context: int, prompt_len: int, prompts: int = 1):
    """(runner, sequences, prompts) over a random KV pool holding `batch` sequences of `context`
    cached tokens (fake_sequences) and `prompts` random prompts of prompt_len tokens, each on
    pages of its own."""
    cfg = model.cfg
    prompt_pages = pages_for(prompt_len, PAGE)
    num_pages = batch * pages_for(context, PAGE) + prompts * prompt_pages
    k, v = allocate_kv_pool(cfg, num_pages, PAGE, dtype, model.embed_tokens.weight.device)
    model.bind_kv_cache(k.normal_(), v.normal_())  # random, never zeros
    runner = ModelRunner(model, PAGE, max_model_len=max(prompt_len, context) + PAGE, max_num_seqs=max(batch, prompts))
    made = []
    for i in range(prompts):
        prompt = Sequence(i, torch.randint(0, cfg.vocab_size, (prompt_len,)).tolist(), SamplingParams())
        first = num_pages - (prompts - i) * prompt_pages
        prompt.block_table = list(range(first, first + prompt_pages))
        made.append(prompt)
    return runner, fake_sequences(batch, context), made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ceil = measure_ceilings()
    print(f"device {ceil['device']} ({ceil['sms']} SMs): bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceil['copy_tbps']:.2f} TB/s", flush=True)

    t0 = time.perf_counter()
    model = load_model(args.model, torch.device("cuda"), torch.bfloat16)
    cfg = model.cfg
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.model}: {weight_bytes / 1e9:.2f} GB of weights, made in {time.perf_counter() - t0:.1f} s", flush=True)

    free = torch.cuda.mem_get_info()[0]
    per_page = page_bytes(cfg, PAGE, torch.bfloat16)
    num_pages = min(int((free - 8 * 2**30) // per_page), 128 * pages_for(8192, PAGE))
    k, v = allocate_kv_pool(cfg, num_pages, PAGE, torch.bfloat16, torch.device("cuda"))
    k.normal_(), v.normal_()  # random, never zeros
    model.bind_kv_cache(k, v)
    t0 = time.perf_counter()
    runner = ModelRunner(model, PAGE, max_model_len=8192 + PAGE, max_num_seqs=128, cuda_graphs=True,
                         prefill_graph_tokens=max(PREFILL_LENS))
    print(f"KV pool {num_pages} pages ({num_pages * PAGE} tokens, {num_pages * per_page / 1e9:.1f} GB); "
          f"CUDA graphs captured in {time.perf_counter() - t0:.1f} s", flush=True)

    results = {"ceilings": ceil, "weight_bytes": weight_bytes, "decode": [], "prefill": []}
    kv_token_bytes = per_page / PAGE
    for batch, context in DECODE_CASES:
        need = batch * pages_for(context, PAGE)
        if need > num_pages:
            print(f"decode B={batch} C={context}: skipped, needs {need * per_page / 1e9:.1f} GB of KV, "
                  f"{num_pages * per_page / 1e9:.1f} GB available", flush=True)
            continue
        seqs = fake_sequences(batch, context)
        runner.decode(seqs)
        graph_bs = min(g for g in runner.graphs if g >= batch)
        replay_ms = cuda_time_ms(runner.graphs[graph_bs].replay, warmup=5, repeat=50)
        step_ms = cuda_time_ms(lambda: runner.decode(seqs), warmup=3, repeat=30)
        floor_ms = (weight_bytes + batch * context * kv_token_bytes) / (ceil["copy_tbps"] * 1e12) * 1e3
        results["decode"].append(dict(batch=batch, context=context, replay_ms=replay_ms,
                                      step_ms=step_ms, floor_ms=floor_ms))
        print(f"decode B={batch:3d} C={context:4d}: graph {replay_ms:6.2f} ms, step {step_ms:6.2f} ms, "
              f"floor {floor_ms:5.2f} ms, ratio {replay_ms / floor_ms:.2f}x", flush=True)
    eager = ModelRunner(model, PAGE, max_model_len=8192 + PAGE, max_num_seqs=128, cuda_graphs=False)
    seqs = fake_sequences(1, 1024)
    eager_ms = cuda_time_ms(lambda: eager.decode(seqs), warmup=3, repeat=20)
    results["decode_eager_b1_c1024_ms"] = eager_ms
    print(f"decode B=1 C=1024 without CUDA graphs: {eager_ms:.2f} ms", flush=True)

    for n in PREFILL_LENS:
        seq = Sequence(0, torch.randint(0, cfg.vocab_size, (n,)).tolist(), SamplingParams())
        seq.block_table = list(range(pages_for(n, PAGE)))
        flops = linear_flops_per_token(cfg) * n + attention_flops(cfg, n) + 2.0 * cfg.hidden_size * cfg.vocab_size
        row = dict(tokens=n, floor_ms=flops / ceil["matmul_tflops"] / 1e9)
        for name, r in (("graph", runner), ("eager", eager)):
            if name == "graph" and r.prefill_graphs.bucket(n, 1) is None:
                continue
            row[name] = (cuda_time_ms(lambda: r.prefill_logits([(seq, n)]), warmup=2, repeat=5),
                         host_time_ms(lambda: r.prefill_logits([(seq, n)])))
        best = min(ms for ms, _ in (row.get("graph", (1e9, 0)), row["eager"]))
        row["tflops"] = flops / best / 1e9
        results["prefill"].append(row)
        print(f"prefill N={n:5d}: " + ", ".join(f"{k} {row[k][0]:6.1f} ms (host {row[k][1]:5.1f} ms)"
                                                 for k in ("graph", "eager") if k in row)
              + f"; best {row['tflops']:4.0f} TFLOP/s = {row['tflops'] / ceil['matmul_tflops']:.0%} of matmul; "
              f"floor {row['floor_ms']:6.1f} ms", flush=True)

    rows, context, chunk = MIXED
    decode_rows = fake_sequences(rows, context)
    prompt = Sequence(rows, torch.randint(0, cfg.vocab_size, (chunk,)).tolist(), SamplingParams())
    prompt.block_table = list(range(num_pages - pages_for(chunk, PAGE), num_pages))
    step = [(s, 1) for s in decode_rows] + [(prompt, chunk)]
    mixed = {name: (cuda_time_ms(lambda: r.prefill_logits(step), warmup=2, repeat=10),
                    host_time_ms(lambda: r.prefill_logits(step))) for name, r in (("graph", runner), ("eager", eager))}
    results["mixed"] = mixed
    print(f"mixed step ({rows} decode rows + {chunk}-token chunk): " + ", ".join(
        f"{k} {ms:.1f} ms (host {host:.1f} ms)" for k, (ms, host) in mixed.items()), flush=True)

    print("\n| case | measured | floor | ratio |\n|---|---|---|---|")
    for d in results["decode"]:
        print(f"| decode B={d['batch']} C={d['context']} | {d['replay_ms']:.2f} ms (step {d['step_ms']:.2f}) "
              f"| {d['floor_ms']:.2f} ms | {d['replay_ms'] / d['floor_ms']:.2f}x |")
    print("\n| prefill | CUDA graph (host) | eager (host) | floor | best / floor | of matmul |\n|---|---|---|---|---|---|")
    for p in results["prefill"]:
        cell = lambda k: f"{p[k][0]:.1f} ms ({p[k][1]:.1f})" if k in p else "-"  # noqa: E731
        best = min(p[k][0] for k in ("graph", "eager") if k in p)
        print(f"| N={p['tokens']} | {cell('graph')} | {cell('eager')} | {p['floor_ms']:.1f} ms "
              f"| {best / p['floor_ms']:.2f}x | {p['tflops'] / ceil['matmul_tflops']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
