# Call 5 (nvidia-h200-x2): the multi-GPU tests on tiny cases rebuilt from main (python
# tests/gpu/tp_cases.py .device/tp/cases; carry .device/tp/cases), then the benchmark
# of the default 7B library (pf.so, md5 de174a90) on the first GPU alone.
export OUT; SKIP_BENCH=1 TEST_TIMEOUT=240 bash benchmarks/cuda/tp_run.sh > /dev/null 2>&1
tail -3 "$OUT/tp_tests.log"
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export CUDA_VISIBLE_DEVICES=0
timeout 330 python3 benchmarks/cuda/run_h200.py --lib .device/bench_j/pf.so --work "$W" \
  --out "$OUT/pf" > "$OUT/pf.log" 2>&1
head -16 "$OUT/pf/decode_bench.md"
