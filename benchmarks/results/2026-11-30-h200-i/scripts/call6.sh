# Call 6 (nvidia-h200-x2): the multi-GPU tests on tiny cases rebuilt at this commit's O2
# (lean_attention and tma_fold on; python tests/gpu/tp_cases.py .device/tp/cases, carried).
export OUT
SKIP_BENCH=1 TEST_TIMEOUT=240 bash benchmarks/cuda/tp_run.sh > /dev/null 2>&1
cp "$OUT/tp_tests.log" "$OUT/call6_tp_tests.log"; cp "$OUT/tp_env.txt" "$OUT/call6_tp_env.txt"
tail -3 "$OUT/call6_tp_tests.log"
