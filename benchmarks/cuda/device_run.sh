#!/bin/bash
# One call on the GPU machine, from the repository root: the GPU tests, issue 4's convert check,
# the kernel microbenchmarks (GEMV sweep, prefill GEMM, prefill attention) and the 7B
# decode/prefill benchmark of every library in .device/bench. Built on the build machine by
# `python benchmarks/cuda/prepare_device_run.py` (.device/site: runtime-only TVM; .device/cases,
# .device/bench, .device/sweep, .device/gemm, .device/attention, .device/elementwise); carry
# what exists.
# Everything lands in $OUT/results.tgz (the device tool returns few files) and a short
# $OUT/summary.txt. SKIP_TESTS / SKIP_CONVERT / SKIP_MICRO / SKIP_BENCH / SKIP_PROBE=1 leave
# steps out.
set -u
OUT=${OUT:-/tmp/mlcc-out}
R=/tmp/mlcc-results
mkdir -p "$OUT" "$R"
# packed after every step, so a call cut short by its time limit still returns what finished
pack() { tar czf "$OUT/results.tgz" -C "$R" .; }
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv \
  > "$R/env.txt" 2>&1
python3 --version >> "$R/env.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  export MLCC_GPU_CASES=$PWD/.device/cases MLCC_ATTENTION_CASES=$PWD/.device/attention
  [ -d .device/moe_cases ] && export MLCC_GPU_MOE_CASES=$PWD/.device/moe_cases
  [ -d .device/targets ] && export MLCC_TARGET_CASES=$PWD/.device/targets
  tests="tests/gpu/test_cuda_parity.py tests/gpu/test_cuda_sampling.py"
  [ -d .device/attention ] && tests="$tests tests/gpu/test_flash_attention_cuda.py"
  [ -d .device/moe_cases ] && tests="$tests tests/gpu/test_moe_cuda.py"
  [ -d .device/targets ] && tests="$tests tests/gpu/test_targets_schedules_cuda.py"
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest $tests -q -p no:cacheprovider 2>&1 \
    | tee "$R/gpu_tests.log" | tail -25
  pack
fi
if [ "${SKIP_CONVERT:-0}" != 1 ]; then
  timeout 200 python3 benchmarks/cuda/convert_check.py .device/cases/models/stories260K \
    /tmp/mlcc-convert "$R/convert_weight_cuda.md" 2>&1 | tail -3
fi
if [ "${SKIP_MICRO:-0}" != 1 ]; then
  # every .device/sweep* folder is a gemv_sweep build (e.g. `build .device/sweep_glu glu`)
  pairs="gemm_bench:gemm attention_bench:attention elementwise_bench:elementwise"
  for folder in .device/sweep*; do pairs="gemv_sweep:${folder#.device/} $pairs"; done
  for pair in $pairs; do
    script=${pair%%:*} folder=.device/${pair##*:}
    [ -d "$folder" ] || continue
    tag=$script; [ "$script" = gemv_sweep ] && tag=gemv_${pair##*:}
    timeout "${MICRO_TIMEOUT:-150}" python3 "benchmarks/cuda/$script.py" run "$folder" \
      "$R/$tag.json" > "$R/$tag.log" 2>&1
    echo "== $tag (exit $?)"; tail -"${MICRO_TAIL:-12}" "$R/$tag.log"
    pack
  done
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  peer=""
  for lib in .device/bench/*.so; do
    name=$(basename "$lib" .so)
    timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/cuda/run_h200.py --lib "$lib" \
      --work /tmp/mlcc-bench --out "$R/$name" $peer > "$R/$name.log" 2>&1
    echo "== $name (exit $?)"; head -14 "$R/$name/decode_bench.md" 2>/dev/null \
      || tail -20 "$R/$name.log"
    peer="--skip-peer"
    pack
  done
fi
if [ "${SKIP_PROBE:-0}" != 1 ]; then
  # the first library again: the same prompt must give the same logits every time
  lib=$(ls .device/bench/*.so 2>/dev/null | head -1)
  if [ -n "$lib" ]; then
    timeout "${PROBE_TIMEOUT:-200}" python3 benchmarks/cuda/determinism_probe.py "$lib" \
      --work /tmp/mlcc-bench > "$R/determinism.log" 2>&1
    echo "== determinism (exit $?)"; tail -2 "$R/determinism.log"
  fi
  pack
fi
pack
grep -h "passed\|failed" "$R/gpu_tests.log" > "$OUT/summary.txt" 2>/dev/null
echo "results: $OUT/results.tgz"
