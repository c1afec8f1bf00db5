#!/usr/bin/env bash
# The serving modes against each other on a GPU (llama3-8b preset, bf16, built-in ShareGPT-like
# workload, SLOs TTFT 0.3 s / TPOT 0.15 s): `semipd bench --launch` starts each mode in turn and
# sweeps the rates. Semi-PD modes run their workers as MPS clients (--start-mps) under the default
# split (prefill 60, decode 100: caps; dynamic starts there).
# Usage: bash benchmarks/bench_modes.sh [unified] [static] [dynamic]   (default: all three)
# Env: MODEL (llama3-8b), RATES (28,32,40,48,56: unified's limit and semi-PD's 1.5x and more on an
# H200), N (1200 requests per rate: 21-43 s of arrivals, many E2E latencies, so the backlog column
# can tell a rate kept up with from a burst absorbed), SERVE_FLAGS (more `semipd serve` flags for
# every mode, e.g. "--max-num-seqs 128"), OUT (out). One mode takes 4-5 minutes: on the GPU machine
# (10 minutes a call) run one mode per call.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
slo="--ttft-slo 0.3 --tpot-slo 0.15"
declare -A flags=(
  [unified]="--mode unified"
  [static]="--mode semi-pd --start-mps"
  [dynamic]="--mode semi-pd --start-mps --dynamic $slo --window 30"
)
modes=("$@"); [ ${#modes[@]} -eq 0 ] && modes=(unified static dynamic)
launch=(); for m in "${modes[@]}"; do launch+=(--launch "$m=${flags[$m]} ${SERVE_FLAGS:-}"); done
name=$(IFS=-; echo "${modes[*]}")
python3 -m semipd bench --model "${MODEL:-llama3-8b}" --rates "${RATES:-28,32,40,48,56}" \
  --num-requests "${N:-1200}" $slo --seed 0 --out "$out/sweep-$name" "${launch[@]}" \
  > "$out/sweep-$name.log" 2>&1
echo "sweep exit $?"; grep -v "req/s\]\|it/s\]" "$out/sweep-$name.log" | tail -n 30
