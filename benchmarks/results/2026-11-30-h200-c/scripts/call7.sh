# Call 7: the GPU tests of the chain and the TMA GEMV after they came to share one helper, and
# the CUDA-graph and parity tests of the default cases.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export MLCC_GPU_CASES=$PWD/.device/cases
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_parity.py \
  > "$OUT/gpu_parity_tests.log" 2>&1
tail -3 "$OUT/gpu_parity_tests.log"
