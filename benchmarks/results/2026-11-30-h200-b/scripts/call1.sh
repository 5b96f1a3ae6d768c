# Call 1: the decode chain's GPU parity tests, then the 7B chain library against main's
# (logits over 64 teacher-forced steps, interleaved decode timing). Run from the repository
# root on the GPU machine with $OUT set; .device/bench holds n_bounded.so (main) and chain.so.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export MLCC_GPU_CASES=$PWD/.device/cases
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_parity.py \
  -k "chain or graph_decode_equals" > "$OUT/gpu_chain_tests.log" 2>&1
tail -3 "$OUT/gpu_chain_tests.log"
python3 "$S/make_params.py" "$W"
timeout 150 python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/chain.so \
  --steps 64 > "$OUT/cmp_chain.log" 2>&1
tail -2 "$OUT/cmp_chain.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/chain.so --device cuda \
  --rounds 20 --steps 128 --out "$OUT/ab_chain.md"
cat "$OUT/ab_chain.md" | tail -6
