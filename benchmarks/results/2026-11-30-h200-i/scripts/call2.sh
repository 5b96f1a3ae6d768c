# Call 2: the GPU tests on cases rebuilt with lean_attention on at O2 and the new *_tmafold
# cases (python -m tests.gpu.cuda_cases .device/cases), then on the 7B: the folded norms
# between TMA GEMVs (fold.so: build7b.py with --opt "O2;fold_norms=1", md5 ad872242) against
# the new O2 default (pf.so, md5 3de31c57): logits over 16 steps, then the pipelined A/B.
export OUT
. benchmarks/results/2026-11-30-h200/scripts/env.sh
cp "$OUT/env.txt" "$OUT/call2_env.txt"
MLCC_GPU_CASES=$PWD/.device/cases timeout 300 python3 -m pytest tests/gpu/test_cuda_parity.py \
  tests/gpu/test_cuda_sampling.py -q -p no:cacheprovider > "$OUT/call2_gpu_tests.log" 2>&1
tail -4 "$OUT/call2_gpu_tests.log"
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" > /dev/null 2>&1
timeout 120 python3 benchmarks/cuda/compare_libs.py $W/params .device/bench_r/pf.so \
  .device/bench_r/fold.so --steps 16 --device cuda > "$OUT/call2_cmp_fold.log" 2>&1
tail -4 "$OUT/call2_cmp_fold.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params .device/bench_r/pf.so \
  .device/bench_r/fold.so --device cuda --pipelined --rounds 20 --steps 128 \
  > "$OUT/call2_pab_fold.md" 2>&1
tail -4 "$OUT/call2_pab_fold.md"
