#!/usr/bin/env bash
# One call on the GPU machine: the whole test suite (GPU tests included), then the benchmarks.
# Full logs go to $OUT (or ./out); short tables come last. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# The gateway's tests drive it with the `openai` package, which the GPU machine lacks; none is a GPU test.
python3 -m pytest -q -rs tests/ --ignore=tests/test_gateway.py --ignore=tests/test_gateway_chat.py \
  --ignore=tests/test_gateway_moderation.py > "$out/tests.log" 2>&1; echo "tests exit $?" >> "$out/tests.log"
python3 -m benchmarks.bench_attention > "$out/bench-attention.log" 2>&1
python3 -m benchmarks.bench_engine --json "$out/bench-engine.json" > "$out/bench-engine.log" 2>&1
echo "== tests"; grep -E "passed|failed|error|exit" "$out/tests.log" | tail -5
echo "== attention"; tail -n 25 "$out/bench-attention.log"
echo "== engine"; tail -n 30 "$out/bench-engine.log"
