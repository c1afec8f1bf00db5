#!/usr/bin/env bash
# Switching cost on a GPU: serve llama3-8b (semi-PD, MPS), keep a steady Poisson load going and
# move the split 22 times (benchmarks/bench_switch.py; the first, cold switch moves both roles, so
# 21 warm decode switches are measured). Env: MODEL, RATE (24: steady, below what decode at 40-50%
# serves), SWITCHES (22), SPLITS (50/50,50/40: PREFILL/DECODE shares to go round; 60/90,60/100
# moves decode near the default split), OUT (out). About 14 s per switch: each waits for both
# standbys.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=$(mktemp -d)
addr=ipc://$XDG_RUNTIME_DIR/switch.sock
python3 -m semipd serve --model "${MODEL:-llama3-8b}" --start-mps --address "$addr" > "$out/switch-serve.log" 2>&1 &
server=$!
python3 -m semipd complete --address "$addr" --wait 600 --prompt-ids 1,2,3 --max-tokens 4 --json > /dev/null || { tail "$out/switch-serve.log"; exit 1; }
python3 -m benchmarks.bench_switch --address "$addr" --switches "${SWITCHES:-22}" --rate "${RATE:-24}" \
  --splits "${SPLITS:-50/50,50/40}" \
  --json "$out/switch.json" > "$out/switch.log" 2>&1
echo "bench_switch exit $?"; grep -v "req/s\]\|it/s\]\|requested" "$out/switch.log" | tail -n 12
kill -TERM $server; wait $server; echo "server exit $?"
