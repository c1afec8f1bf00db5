#!/usr/bin/env bash
# The cost of moderation on a GPU: `semipd serve` (llama3-8b preset, bf16, default split
# under MPS) beside `semipd scm`
# (a random monitor of Qwen2.5-0.5B's shape, bf16, on the same GPU), `semipd bench` (built-in
# ShareGPT-like workload, Poisson arrivals) with every request monitored and without:
#   off        no monitor
#   scored     --moderate all --scm-show scored     (a token reaches the client once scored)
#   immediate  --moderate all --scm-show immediate  (tokens go out at once)
#   MODE@MS    MODE with the monitor stepping at most every MS ms (`semipd scm --step-interval-ms`)
# The monitor runs with --threshold 1.0 so that it scores every token but never fires: every
# request runs its full length in every mode. Prints TPOT (and TTFT) per mode and the verdict lag
# in tokens (tokens generated between a token and the arrival of its score, from the
# controller's stats). Logs and JSON reports go to $OUT (or ./out).
# Usage: bash benchmarks/bench_scm_serving.sh [RATE] [NUM_REQUESTS] [MODEL] [MONITOR] [MODES...]
set -uo pipefail
rate=${1:-8}; n=${2:-200}; model=${3:-llama3-8b}; monitor=${4:-scm-qwen2.5-0.5b}
modes=("${@:5}"); [ ${#modes[@]} -gt 0 ] || modes=(off scored immediate)
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=$(mktemp -d)
scm=ipc://$XDG_RUNTIME_DIR/scm.sock

# Every process runs as a client of one MPS daemon of our own, as semi-PD serving does: without
# MPS the monitor's CUDA context time-slices with the workers' instead of running beside them.
export CUDA_MPS_PIPE_DIRECTORY=$XDG_RUNTIME_DIR/mps/pipe CUDA_MPS_LOG_DIRECTORY=$XDG_RUNTIME_DIR/mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || { echo "could not start an MPS daemon"; exit 1; }
trap 'echo quit | nvidia-cuda-mps-control' EXIT

wait_for() {  # wait_for LOG PATTERN PID
  for _ in $(seq 900); do grep -q "$2" "$1" && return 0; kill -0 "$3" 2>/dev/null || break; sleep 0.5; done
  echo "gave up waiting for '$2' in $1"; tail -20 "$1"; return 1
}

for mode in "${modes[@]}"; do
  show=${mode%@*}; interval=0; [[ $mode == *@* ]] && interval=${mode#*@}
  addr=ipc://$XDG_RUNTIME_DIR/serve-$mode.sock
  # The monitor first (in every mode, so that each server gets the same memory), with a fixed KV
  # pool (256 streams x 64 pages of 16 tokens): the server sizes its own pool from what is left.
  python3 -m semipd scm --model "$monitor" --address "$scm" --threshold 1.0 --max-streams 256 \
    --num-pages 16384 --max-model-len 4096 --step-interval-ms "$interval" > "$out/scm-$mode.log" 2>&1 &
  monitor_pid=$!
  wait_for "$out/scm-$mode.log" "ready at" $monitor_pid || exit 1
  flags=(); [ "$show" != off ] && flags=(--scm "$scm" --moderate all --scm-show "$show")
  python3 -m semipd serve --model "$model" --address "$addr" "${flags[@]}" > "$out/serve-$mode.log" 2>&1 &
  server=$!
  wait_for "$out/serve-$mode.log" "serving" $server || exit 1
  [ "$show" != off ] && { wait_for "$out/serve-$mode.log" "content monitor at .* connected" $server || exit 1; }
  python3 -m semipd bench --address "$addr" --rate "$rate" --num-requests "$n" --seed 0 \
    --out "$out/bench-$mode.json" > "$out/bench-$mode.log" 2>&1
  python3 -m semipd stats --address "$addr" --json > "$out/stats-$mode.json"
  kill -TERM $server $monitor_pid; wait $server $monitor_pid
done

python3 - "$out" "${modes[@]}" <<'EOF'
import json, os, sys
out, modes = sys.argv[1], sys.argv[2:]
ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"
print(f"{'mode':<13} {'done':>5} {'TPOT mean':>10} {'p50':>7} {'p90':>7} {'TTFT mean':>10} {'p90':>7}"
      f" {'lag mean':>9} {'p50':>5} {'p90':>5} {'max':>5} {'failures':>8}")
for mode in modes:
    s = json.load(open(os.path.join(out, f"bench-{mode}.json")))["summary"]
    scm = json.load(open(os.path.join(out, f"stats-{mode}.json"))).get("scm") or {}
    lag = scm.get("lag_tokens", {})
    mean = "-" if lag.get("mean") is None else f"{lag['mean']:.2f}"
    print(f"{mode:<13} {s['completed']:>5} {ms(s['tpot_s']['mean']):>10} {ms(s['tpot_s']['p50']):>7} "
          f"{ms(s['tpot_s']['p90']):>7} {ms(s['ttft_s']['mean']):>10} {ms(s['ttft_s']['p90']):>7} {mean:>9} "
          f"{lag.get('p50', '-')!s:>5} {lag.get('p90', '-')!s:>5} {lag.get('max', '-')!s:>5} {scm.get('failures', '-')!s:>8}")
EOF
