#!/bin/bash
# One call on the GPU machine, from the repository root: parity tests, issue 4's convert check,
# the q4 GEMV block-shape sweep, the 7B decode/prefill benchmark. Needs the carried
# .device/site (runtime-only TVM for the machine's Python), .device/cases (tests/gpu/cuda_cases.py) and .device/bench/*.so (the 7B
# library, `python benchmarks/cuda/prepare_device_run.py`), optionally .device/sweep
# (`python benchmarks/cuda/gemv_sweep.py build .device/sweep`). Results go to $OUT.
set -u
OUT=${OUT:-/tmp/mlcc-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv \
  > "$OUT/env.txt" 2>&1
python3 --version >> "$OUT/env.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  MLCC_GPU_CASES=$PWD/.device/cases timeout 300 python3 -m pytest tests/gpu/test_cuda_parity.py \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "${SKIP_CONVERT:-0}" != 1 ]; then
  timeout 200 python3 benchmarks/cuda/convert_check.py .device/cases/models/stories260K \
    /tmp/mlcc-convert "$OUT/convert_weight_cuda.md" 2>&1 | tail -15
fi
if [ "${SKIP_SWEEP:-0}" != 1 ] && [ -f .device/sweep/gemv_sweep.so ]; then
  timeout 200 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep "$OUT/gemv_sweep.json" \
    2>&1 | tee "$OUT/sweep.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/cuda/run_h200.py \
    --lib .device/bench/llama2_7b_q4f16_1.so --work /tmp/mlcc-bench --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" | tail -60
fi
