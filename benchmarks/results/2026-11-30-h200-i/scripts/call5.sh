# Call 5: tma_fold on at O2 (the norms between TMA GEMVs folded, their consumers released at
# the producers' start: fold_qg's device source). The GPU tests on cases rebuilt with it
# (python -m tests.gpu.cuda_cases .device/cases), the new default 7B O2 build (o2.so, md5
# 2153cc85; build7b.py) against the one before it (lean.so, 3de31c57) over 16 steps, then the
# issue's benchmark (run_h200.py) of o2.so: the figure of record.
export OUT
. benchmarks/results/2026-11-30-h200/scripts/env.sh
cp "$OUT/env.txt" "$OUT/call5_env.txt"
MLCC_GPU_CASES=$PWD/.device/cases timeout 300 python3 -m pytest tests/gpu/test_cuda_parity.py \
  tests/gpu/test_cuda_sampling.py -q -p no:cacheprovider > "$OUT/call5_gpu_tests.log" 2>&1
tail -4 "$OUT/call5_gpu_tests.log"
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" > /dev/null 2>&1
timeout 120 python3 benchmarks/cuda/compare_libs.py $W/params .device/bench_t/lean.so \
  .device/bench_t/o2.so --steps 16 --device cuda > "$OUT/call5_cmp_o2.log" 2>&1
tail -2 "$OUT/call5_cmp_o2.log"
timeout 330 python3 benchmarks/cuda/run_h200.py --lib .device/bench_t/o2.so --work "$W" \
  --out "$OUT/o2" > "$OUT/o2.log" 2>&1
head -16 "$OUT/o2/decode_bench.md"
