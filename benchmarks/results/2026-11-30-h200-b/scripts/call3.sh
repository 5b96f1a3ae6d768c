# Call 3: the decode chain's GPU tests (bounds as the long prefill test's).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export MLCC_GPU_CASES=$PWD/.device/cases
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_parity.py \
  -k "chain" > "$OUT/gpu_chain_tests.log" 2>&1
grep -E "^E  .*(step|Max abs)|passed|failed" "$OUT/gpu_chain_tests.log" | tail -8
