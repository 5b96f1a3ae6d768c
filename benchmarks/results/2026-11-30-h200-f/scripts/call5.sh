# Call 5: the new default (decode attention with 8 warps, at most 16 splits, one block a head up
# to 160 positions; o2_attn.so, build7b.py O2, byte-identical to call 4's a8_s16.so): the GPU
# parity and sampling tests on cases rebuilt from this code, then the benchmark.
export MLCC_GPU_CASES=$PWD/.device/cases PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
timeout 150 python3 -m pytest tests/gpu/test_cuda_parity.py tests/gpu/test_cuda_sampling.py -q \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_g
timeout 280 python3 benchmarks/cuda/run_h200.py --lib $B/o2_attn.so --work "$W" \
  --out "$OUT/o2_attn" > "$OUT/o2_attn.log" 2>&1
head -16 "$OUT/o2_attn/decode_bench.md"
