# Call 5: the GPU tests of the TMA GEMV (tiny K = 256 models against their libraries without
# it, plain and from a CUDA graph), then the per-kernel decode breakdown of main's 7B library
# and of the TMA one whose attention and GLU release it at their start.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export MLCC_GPU_CASES=$PWD/.device/cases
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_parity.py \
  -k "tma or chain" > "$OUT/gpu_tma_tests.log" 2>&1
tail -3 "$OUT/gpu_tma_tests.log"
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 200 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/n_bounded.so $B/tma_att_glu.so > "$OUT/breakdown.txt" 2>&1
grep -v Warn "$OUT/breakdown.txt" | head -40
