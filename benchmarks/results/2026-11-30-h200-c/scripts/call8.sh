# Call 8: o_proj alone on the TMA GEMV, launched as the attention ends (tma_o) or released at
# the attention's start so that its copies run during the attention (tma_o_att), against main;
# then the breakdown of tma_o_att.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/tma_o.so \
  $B/tma_o_att.so --device cuda --rounds 12 --steps 128 --out "$OUT/ab_tma_o.md"
tail -5 "$OUT/ab_tma_o.md"
timeout 150 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/tma_o_att.so > "$OUT/breakdown_tma_o_att.txt" 2>&1
grep -v Warn "$OUT/breakdown_tma_o_att.txt" | head -9
