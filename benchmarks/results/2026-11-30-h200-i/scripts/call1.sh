# Call 1: the GPU tests with the three *_lean parity cases (cases: python -m tests.gpu.cuda_cases
# .device/cases), then the pipelined A/B of the default 7B O2 library (pf.so, md5 de174a90)
# against the same built with --opt "O2;lean_attention=1" (lean.so, md5 3de31c57), both built
# with benchmarks/results/2026-11-30-h200/scripts/build7b.py into .device/bench_q.
export OUT
. benchmarks/results/2026-11-30-h200/scripts/env.sh
cp "$OUT/env.txt" "$OUT/call1_env.txt"
MLCC_GPU_CASES=$PWD/.device/cases timeout 300 python3 -m pytest tests/gpu/test_cuda_parity.py \
  tests/gpu/test_cuda_sampling.py -q -p no:cacheprovider > "$OUT/call1_gpu_tests.log" 2>&1
tail -4 "$OUT/call1_gpu_tests.log"
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" > /dev/null 2>&1
timeout 150 python3 benchmarks/ab_decode.py $W/params .device/bench_q/pf.so \
  .device/bench_q/lean.so --device cuda --pipelined --rounds 20 --steps 128 \
  > "$OUT/call1_pab_lean.md" 2>&1
tail -4 "$OUT/call1_pab_lean.md"
