# Call 14: the GLU GEMV releasing the down GEMV at its start (glu_rel.so, build_glu_release.py)
# against the default (o2_glu.so): logits, then an interleaved A/B.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2_glu.so $B/glu_rel.so \
  --steps 16 > "$OUT/cmp_glu_rel.log" 2>&1
tail -1 "$OUT/cmp_glu_rel.log"
timeout 110 python3 benchmarks/ab_decode.py $W/params $B/o2_glu.so $B/glu_rel.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_glu_rel.md" >/dev/null 2>&1
tail -3 "$OUT/ab_glu_rel.md"
