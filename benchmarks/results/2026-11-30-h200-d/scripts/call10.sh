# Call 10: call 9's best (the GLU mode at 2 chunks in flight) again: logits against the
# default of call 5, and an interleaved A/B with n_bounded and that default.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 100 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2_tma.so $B/glu2.so \
  --steps 32 > "$OUT/cmp_glu2.log" 2>&1
tail -1 "$OUT/cmp_glu2.log"
timeout 220 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/o2_tma.so $B/glu2.so \
  --device cuda --rounds 16 --steps 128 --out "$OUT/ab_glu2.md" >/dev/null 2>&1
tail -4 "$OUT/ab_glu2.md"
