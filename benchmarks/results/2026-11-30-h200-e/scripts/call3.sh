# Call 3 (nvidia-h200-x2, carry .device/site .device/tp): the multi-GPU tests, then the 7B
# checkpoint and params.
export OUT; SKIP_BENCH=1 TEST_TIMEOUT=240 bash benchmarks/cuda/tp_run.sh
STAGE=convert SKIP_TESTS=1 BENCH_TIMEOUT=300 bash benchmarks/cuda/tp_run.sh 2>&1 | tail -5
