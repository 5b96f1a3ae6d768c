# Call 4: the shipped chain (no early release): GPU tests, logits against main's library.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export MLCC_GPU_CASES=$PWD/.device/cases
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_parity.py \
  -k "chain" > "$OUT/gpu_chain_tests.log" 2>&1
tail -1 "$OUT/gpu_chain_tests.log"
python3 "$S/make_params.py" "$W"
timeout 150 python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/chain.so \
  --steps 64 > "$OUT/cmp_chain.log" 2>&1
tail -1 "$OUT/cmp_chain.log"
