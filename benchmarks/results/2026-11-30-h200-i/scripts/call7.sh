# Call 7: the benchmark script as a user runs it on a fresh machine, on the default 7B O2 build
# of main (.device/bench/o2.so, md5 2153cc85; build7b.py): run_h200.py (checkpoint, both
# conversions, the HF peer, every figure) and the determinism probe; the GPU tests ran in call 5.
export OUT
SKIP_TESTS=1 SKIP_CONVERT=1 SKIP_MICRO=1 bash benchmarks/cuda/device_run.sh > "$OUT/call7_run.log" 2>&1
tail -22 "$OUT/call7_run.log"
