#!/usr/bin/env bash
# Serving benchmark on a GPU: start `semipd serve` (llama3-8b preset, bf16), record each process's
# GPU memory, then run `semipd bench` (built-in ShareGPT-like workload, Poisson arrivals) at
# several rates. Logs and JSON reports go to $OUT (or ./out).
# Usage: bash benchmarks/bench_serving.sh [MODEL] [RATES] [NUM_REQUESTS]
set -uo pipefail
model=${1:-llama3-8b}; rates=${2:-"2 4 8 16"}; n=${3:-200}
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=$(mktemp -d)
addr=ipc://$XDG_RUNTIME_DIR/bench.sock
nvidia-smi --query-gpu=memory.used --format=csv,noheader > "$out/mem-before.txt"
python3 -m semipd serve --model "$model" --address "$addr" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do grep -q "serving" "$out/serve.log" && break; kill -0 $server || break; sleep 0.5; done
grep -q "serving" "$out/serve.log" || { echo "server did not start"; tail -20 "$out/serve.log"; exit 1; }
{ echo "== GPU memory per process (MiB), before serving: $(cat "$out/mem-before.txt")"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
  python3 -m semipd stats --address "$addr"; } | tee "$out/memory.txt"
for rate in $rates; do
  python3 -m semipd bench --address "$addr" --rate "$rate" --num-requests "$n" --seed 0 \
    --ttft-slo 0.3 --tpot-slo 0.15 --out "$out/bench-rate-$rate.json" > "$out/bench-rate-$rate.log" 2>&1
  echo "== rate $rate"; grep -v "%|" "$out/bench-rate-$rate.log" | tail -n 9
done
kill -TERM $server; wait $server; echo "server exit $?"
