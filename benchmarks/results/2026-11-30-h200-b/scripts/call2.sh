# Call 2: the decode chain's GPU tests against the library without it, the per-kernel
# breakdown of main's and the chain's 7B libraries, and an interleaved A/B with the chain
# that never releases the next kernel early (scripts/build_chain_notrigger.py).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
export MLCC_GPU_CASES=$PWD/.device/cases
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_parity.py \
  -k "chain" > "$OUT/gpu_chain_tests.log" 2>&1
tail -3 "$OUT/gpu_chain_tests.log"
python3 "$S/make_params.py" "$W"
timeout 150 python3 "$S/breakdown.py" $W/params $B/n_bounded.so $B/chain.so \
  > "$OUT/breakdown.txt" 2>&1
grep -v Warn "$OUT/breakdown.txt" | head -30
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/chain.so \
  $B/chain_notrig.so --device cuda --rounds 12 --steps 128 --out "$OUT/ab_chain.md"
tail -6 "$OUT/ab_chain.md"
