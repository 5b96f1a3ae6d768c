# Call 4 (the same warm machine): 1 GPU against 2 GPUs on the 7B shape.
export OUT; SKIP_TESTS=1 BENCH_TIMEOUT=420 bash benchmarks/cuda/tp_run.sh 2>&1 | tail -30
