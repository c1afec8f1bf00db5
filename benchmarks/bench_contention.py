"""How much a running prefill slows decode on one GPU, as the two run in serving: two MPS clients.

    python -m benchmarks.bench_contention [--model llama3-8b] [--prefill-sm 60] [--decode-sm 100]
        [--tokens 256,512,1024,2048] [--prompts 1] [--seconds 3] [--json out.json]

A decode process (cap --decode-sm, normal MPS priority) runs decode steps of batch 128 with 512
cached tokens back to back (a CUDA graph each); a prefill process (cap --prefill-sm, priority
below normal, as serving runs it) runs prefills of N tokens back to back, eagerly: one prompt, or
--prompts K of N / K tokens each (a serving step that took K queued prompts). For each N, each runs
alone for --seconds, then both at once. Serving's question: prefill must get through a given
number of tokens per second; does it slow decode less in few large batches (busy less of the
time, each batch reading the weights once) or in many small ones? The last column answers it:
decode's extra time per prefill token. On a CPU (no MPS, `--device cpu`) it runs as a smoke test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def decode_shape(device: str) -> tuple[int, int]:
    """(batch, cached tokens) of the decode step: serving's on a GPU, a small one on a CPU."""
    return (128, 512) if device == "cuda" else (4, 32)


def child(role: str, model_name: str, device: str, max_tokens: int, prompts: int) -> None:
    """Load the model, then for each `run N SECONDS` line on stdin run the role's step back to
    back for that long and print `RESULT {"steps": n, "ms": [median, mean]}`."""
    import torch

    from benchmarks.bench_engine import decode_and_prompts
    from semipd.shared.loader import load_model

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = load_model(model_name, dev, dtype, progress=False)
    runner, seqs, made = decode_and_prompts(model, dtype, *decode_shape(device), max_tokens // prompts, prompts)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print("READY", flush=True)
    for line in sys.stdin:
        _, tokens, seconds = line.split()
        step = (lambda: runner.decode(seqs)) if role == "decode" else \
            (lambda n=int(tokens) // prompts: runner.prefill_logits([(p, n) for p in made]))
        step(), sync()  # a new prefill length compiles its kernels here, not in the timing
        times, until = [], time.perf_counter() + float(seconds)
        while time.perf_counter() < until:
            start = time.perf_counter()
            step(), sync()
            times.append((time.perf_counter() - start) * 1e3)
        print("RESULT " + json.dumps({"steps": len(times), "ms": [statistics.median(times), statistics.mean(times)]}),
              flush=True)


class Child:
    def __init__(self, role: str, args, share: int | None, priority: int):
        env = dict(os.environ)
        if share is not None:
            env.update(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(share), CUDA_MPS_CLIENT_PRIORITY=str(priority))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_contention", "--child", role, "--model", args.model,
             "--device", args.device, "--tokens", args.tokens, "--prompts", str(args.prompts)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.role = role
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        sys.exit(f"the {self.role} process exited (code {self.proc.wait()})")

    def start(self, tokens: int, seconds: float) -> None:
        self.proc.stdin.write(f"run {tokens} {seconds}\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        return json.loads(self._expect("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run(children: list[Child], tokens: int, seconds: float) -> list[dict]:
    for c in children:
        c.start(tokens, seconds)
    return [c.result() for c in children]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prefill-sm", type=int, default=60)
    ap.add_argument("--decode-sm", type=int, default=100)
    ap.add_argument("--tokens", default="256,512,1024,2048", help="prefill lengths")
    ap.add_argument("--prompts", type=int, default=1, help="prompts a prefill step's tokens are split over")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["decode", "prefill"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    if any(n % args.prompts for n in lengths):
        ap.error(f"every --tokens length must split evenly over --prompts {args.prompts}")
    if args.child:
        return child(args.child, args.model, args.device, max(lengths), args.prompts)
    cuda, daemon = args.device == "cuda", None
    if cuda:
        from semipd.services.controller.mps import MpsDaemon
        daemon = MpsDaemon(tempfile.mkdtemp(prefix="semipd-contention-"))
    decode = Child("decode", args, args.decode_sm if cuda else None, 0)
    prefill = Child("prefill", args, args.prefill_sm if cuda else None, 1)
    rows = []
    try:
        for n in lengths:
            d_alone, = run([decode], n, args.seconds)
            p_alone, = run([prefill], n, args.seconds)
            d_both, p_both = run([decode, prefill], n, args.seconds)
            rows.append(dict(tokens=n, decode_alone=d_alone, prefill_alone=p_alone, decode_both=d_both,
                             prefill_both=p_both))
            print(f"prefill {n} tokens: done", flush=True)
    finally:
        decode.close(), prefill.close()
        if daemon:
            daemon.stop()
    batch, context = decode_shape(args.device)
    print(f"\n{args.model}, decode batch {batch} x {context} cached tokens at cap {args.decode_sm}%, prefill "
          f"({args.prompts} prompt{'s' * (args.prompts > 1)} a step) at cap {args.prefill_sm}% (priority below "
          f"normal); median ms, {args.seconds:g} s per cell")
    print("| prefill tokens | prefill ms alone / beside decode | prefill tokens/s beside decode "
          "| decode ms alone / beside prefill | decode's extra ms per 1k prefill tokens |\n|---:|---|---:|---|---:|")
    for r in rows:
        d0, d1 = r["decode_alone"]["ms"][0], r["decode_both"]["ms"][0]
        p0, p1 = r["prefill_alone"]["ms"][0], r["prefill_both"]["ms"][0]
        rate = r["tokens"] / p1 * 1e3
        # Over one second beside prefill, decode ran 1000/d1 steps, each d1 - d0 ms longer, while
        # prefill got through `rate` tokens.
        extra = (1e3 / d1) * (d1 - d0) / rate * 1e3
        print(f"| {r['tokens']} | {p0:.1f} / {p1:.1f} | {rate:.0f} | {d0:.2f} / {d1:.2f} | {extra:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
