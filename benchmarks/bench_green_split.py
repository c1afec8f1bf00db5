"""Do two processes on complementary CUDA green contexts get disjoint SMs?

    python -m benchmarks.bench_green_split [--sms 66] [--seconds 4]     (an MPS daemon must run)

Each client process runs a bf16 8192^3 matmul in a loop for a fixed window that starts at the
same wall-clock moment in every process, and reports its rate. Each one takes its SMs one of
three ways:
- `torch`: torch.cuda.green_contexts.GreenContext.create(N), the first N SMs of the driver's split;
- `first` / `rest`: the driver's SM split (cuDevSmResourceSplitByCount through cuda-python): the
  group of N SMs, or the remainder, which is its complement;
- `all`: no green context (the whole GPU, shared with the other client by MPS).
Two clients on disjoint sets should together reach about the sum of their rates alone; two on
overlapping sets about what one set gives.
"""

import argparse
import json
import subprocess
import sys
import time

N = 8192


def client(how: str, sms: int, start_at: float, seconds: float) -> dict:
    import torch
    a = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)
    got = None
    if how == "torch":
        ctx = torch.cuda.green_contexts.GreenContext.create(sms, 0)
        ctx.set_context() if hasattr(ctx, "set_context") else ctx.make_current()
        got = sms
    elif how in ("first", "rest"):
        from cuda.bindings import driver as cu
        _, dev = cu.cuDeviceGet(0)
        _, whole = cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
        err, groups, count, remaining = cu.cuDevSmResourceSplitByCount(1, whole, 0, sms)
        assert err == cu.CUresult.CUDA_SUCCESS and count == 1, (err, count)
        part = groups[0] if how == "first" else remaining
        got = part.sm.smCount
        err, desc = cu.cuDevResourceGenerateDesc([part], 1)
        assert err == cu.CUresult.CUDA_SUCCESS, err
        err, green = cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
        assert err == cu.CUresult.CUDA_SUCCESS, err
        err, ctx = cu.cuCtxFromGreenCtx(green)
        assert err == cu.CUresult.CUDA_SUCCESS, err
        (err,) = cu.cuCtxPushCurrent(ctx)
        assert err == cu.CUresult.CUDA_SUCCESS, err
        torch.cuda.set_stream(torch.cuda.default_stream())
    for _ in range(5):  # warm-up in the context the loop runs in
        a @ b
    torch.cuda.synchronize()
    time.sleep(max(0.0, start_at - time.time()))
    began, done = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        for _ in range(4):
            a @ b
        torch.cuda.synchronize()
        done += 4
    elapsed = time.perf_counter() - began
    return {"how": how, "sms": got, "tflops": 2 * N ** 3 * done / elapsed / 1e12}


def run(clients: list[tuple[str, int]], seconds: float) -> list[dict]:
    start_at = time.time() + 15  # past every client's start-up (torch import, context, warm-up)
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_green_split", "--client", how,
                               "--sms", str(sms), "--start-at", str(start_at), "--seconds", str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for how, sms in clients]
    out = []
    for (how, sms), proc in zip(clients, procs):
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        out.append(json.loads(lines[-1]) if lines else {"how": how, "sms": sms, "error": stderr.strip()[-300:]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sms", type=int, default=66)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--client", default=None)
    ap.add_argument("--start-at", type=float, default=0.0)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client(args.client, args.sms, args.start_at, args.seconds)), flush=True)
        return
    n = args.sms
    cases = [("alone: torch first N", [("torch", n)]), ("alone: driver first N", [("first", n)]),
             ("alone: driver rest", [("rest", n)]), ("alone: whole GPU", [("all", 0)]),
             ("two: torch N + torch N (same SMs)", [("torch", n), ("torch", n)]),
             ("two: driver first N + driver rest", [("first", n), ("rest", n)]),
             ("two: torch N + driver rest", [("torch", n), ("rest", n)]),
             ("two: whole GPU each (MPS shares)", [("all", 0), ("all", 0)])]
    rows = []
    for name, clients in cases:
        results = run(clients, args.seconds)
        rows.append((name, results))
        print(name, json.dumps(results), flush=True)
    print("\n| case | SMs per client | TFLOP/s per client | sum |\n|---|---|---|---|")
    for name, results in rows:
        if any("error" in r for r in results):
            print(f"| {name} | - | error: {' / '.join(r.get('error', '')[-120:] for r in results)} | - |")
            continue
        rates = [r["tflops"] for r in results]
        print(f"| {name} | {' + '.join(str(r['sms']) for r in results)} | {' + '.join(f'{x:.0f}' for x in rates)} "
              f"| {sum(rates):.0f} |")


if __name__ == "__main__":
    main()
