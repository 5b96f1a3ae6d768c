# Call 6: the decode attention releasing the o_proj GEMV after its walk over the positions
# instead of at its start (att_late.so, build_att_late.py) against the default and n_bounded.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 100 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2_tma.so $B/att_late.so \
  --steps 32 > "$OUT/cmp_att_late.log" 2>&1
tail -1 "$OUT/cmp_att_late.log"
timeout 220 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/o2_tma.so \
  $B/att_late.so --device cuda --rounds 16 --steps 128 --out "$OUT/ab_att_late.md"
tail -4 "$OUT/ab_att_late.md"
