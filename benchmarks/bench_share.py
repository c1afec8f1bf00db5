"""What an SM share buys: the work of each phase timed in a process whose MPS quota is each share.

    python -m benchmarks.bench_share [--model llama3-8b] [--shares 100,80,60,40,20] [--json out.json]

A quota is fixed when a process creates its CUDA context, so each share runs in a fresh child
(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set first) under an MPS daemon this script starts and stops.
Each child is alone on the GPU and measures: its copy bandwidth and bf16 matmul rate; one decode
step (CUDA graph) at batch B=128 with C=512 cached tokens; sampling that batch's logits at
temperature 1 with the torch path and with the fused Triton kernel; a prefill of one 2048-token
prompt. Floors use the whole GPU's ceilings (the first share, 100): decode = (weights + B x C
tokens of K/V) / copy bandwidth, prefill = FLOPs / matmul rate. The partitioner models TPOT as
a2 / y + b2 and the prefill service rate as proportional to x: this shows how far that holds.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

BATCH, CONTEXT, PREFILL = 128, 512, 2048
PAGE = 16


def measure(model_name: str) -> dict:
    """Run in the child: every figure for this process's share."""
    import torch

    from benchmarks.bench_engine import attention_flops, decode_and_prompts, linear_flops_per_token
    from benchmarks.common import cuda_time_ms, measure_ceilings
    from semipd.shared.kernels.triton_sampling import gumbel_max as fused_gumbel_max
    from semipd.shared.kv_cache import page_bytes
    from semipd.shared.loader import load_model
    from semipd.shared.sampling import gumbel_max, row_hash

    ceil = measure_ceilings()
    dev = torch.device("cuda")
    model = load_model(model_name, dev, torch.bfloat16, progress=False)
    cfg = model.cfg
    runner, seqs, [prompt] = decode_and_prompts(model, torch.bfloat16, BATCH, CONTEXT, PREFILL)
    runner.decode(seqs)
    decode_ms = cuda_time_ms(runner.graphs[BATCH].replay, warmup=5, repeat=30)
    logits = torch.randn(BATCH, cfg.vocab_size, device=dev) * 3
    ones, zeros = torch.ones(BATCH, device=dev), torch.zeros(BATCH, device=dev)
    keys = row_hash(torch.arange(BATCH, device=dev), torch.zeros(BATCH, dtype=torch.int64, device=dev))
    torch_ms = cuda_time_ms(lambda: gumbel_max(logits, ones, zeros, keys), repeat=20)
    fused_ms = cuda_time_ms(lambda: fused_gumbel_max(logits, ones, zeros, keys), repeat=20)

    prefill_ms = cuda_time_ms(lambda: runner.prefill_logits([(prompt, PREFILL)]), warmup=2, repeat=5)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(ceilings=ceil, decode_ms=decode_ms, sample_torch_ms=torch_ms, sample_fused_ms=fused_ms,
                prefill_ms=prefill_ms, weight_bytes=weight_bytes,
                decode_bytes=weight_bytes + BATCH * CONTEXT * page_bytes(cfg, PAGE, torch.bfloat16) / PAGE,
                prefill_flops=linear_flops_per_token(cfg) * PREFILL + attention_flops(cfg, PREFILL))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--shares", default="100,80,60,40,20", help="MPS percentages, the whole GPU (100) first")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.model)), flush=True)
        return
    shares = [int(s) for s in args.shares.split(",")]
    if shares[0] != 100:
        sys.exit("--shares must start with 100: its ceilings are the floors' denominators")
    from semipd.services.controller.mps import MpsDaemon
    daemon = MpsDaemon(tempfile.mkdtemp(prefix="semipd-share-"))
    rows = []
    try:
        for share in shares:
            env = dict(os.environ, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(share))
            child = subprocess.run([sys.executable, "-m", "benchmarks.bench_share", "--child", "--model", args.model],
                                   env=env, capture_output=True, text=True)
            line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"share {share}%: the child failed\n{child.stderr[-3000:]}")
            rows.append(dict(share=share, **json.loads(line[len("RESULT "):])))
            r = rows[-1]
            print(f"share {share:3d}%: {r['ceilings']['sms']} SMs, decode {r['decode_ms']:.2f} ms, "
                  f"prefill {r['prefill_ms']:.1f} ms", flush=True)
    finally:
        daemon.stop()
    full = rows[0]["ceilings"]
    print(f"\n{full['device']}, {args.model} bf16; decode B={BATCH} C={CONTEXT}, prefill {PREFILL} tokens; "
          f"floors at the whole GPU's {full['copy_tbps']:.2f} TB/s and {full['matmul_tflops']:.0f} TFLOP/s")
    print("| share | SMs | copy TB/s | matmul TFLOP/s | decode ms (floor) | sample T=1 torch / fused ms "
          "| prefill ms (floor) |\n|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        c = r["ceilings"]
        decode_floor = r["decode_bytes"] / (full["copy_tbps"] * 1e12) * 1e3
        prefill_floor = r["prefill_flops"] / (full["matmul_tflops"] * 1e12) * 1e3
        print(f"| {r['share']} | {c['sms']} | {c['copy_tbps']:.2f} | {c['matmul_tflops']:.0f} "
              f"| {r['decode_ms']:.2f} ({decode_floor:.2f}, {r['decode_ms'] / decode_floor:.2f}x) "
              f"| {r['sample_torch_ms']:.2f} / {r['sample_fused_ms']:.3f} "
              f"| {r['prefill_ms']:.1f} ({prefill_floor:.1f}, {r['prefill_ms'] / prefill_floor:.2f}x) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, batch=BATCH, context=CONTEXT, prefill_tokens=PREFILL, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
