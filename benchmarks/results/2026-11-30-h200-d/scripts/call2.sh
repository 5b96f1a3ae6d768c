# Call 2: the A/B of main, all three shapes on the depth-limited TMA GEMV, and o_proj alone on
# it released at the decode attention's start; then the per-kernel table of the qkv library.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 170 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/all_c4d4.so \
  $B/o_att_c4d4.so --device cuda --rounds 10 --steps 128 --out "$OUT/ab_all_depth.md"
tail -6 "$OUT/ab_all_depth.md"
timeout 150 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/${BREAKDOWN:-qkv_c4d4}.so > "$OUT/breakdown.txt" 2>&1
grep -v Warn "$OUT/breakdown.txt" | head -12
