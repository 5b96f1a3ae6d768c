# Call 1: the TMA GEMV with a producer warp keeping at most `depth` chunks a block in flight
# (TmaConfig.depth): validated standalone sweep beside the shipped picks; then in the 7B decode,
# logits of the library with all three shapes on it against main's, and an interleaved A/B of
# main and the qkv GEMV alone on it at two configurations.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 150 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma_depth \
  "$OUT/gemv_tma_depth.json" > "$OUT/gemv_tma_depth.log" 2>&1
grep -v Warn "$OUT/gemv_tma_depth.log" | tail -32
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 100 python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/all_c4d4.so \
  --steps 32 > "$OUT/cmp_all_c4d4.log" 2>&1
tail -4 "$OUT/cmp_all_c4d4.log"
timeout 170 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/qkv_c8d3.so \
  $B/qkv_c4d4.so --device cuda --rounds 10 --steps 128 --out "$OUT/ab_qkv_depth.md"
tail -6 "$OUT/ab_qkv_depth.md"
