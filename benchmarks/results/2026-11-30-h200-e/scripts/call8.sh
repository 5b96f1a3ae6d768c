# Call 8: down behind the GLU with 20 (pd_w20: 4 K slices x 5 teams, chunks of 10) and 24
# consumer warps (pd_w24: x 6, chunks of 12) against the new default's 16 (o2_down.so).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in pd_w20 pd_w24; do
  timeout 40 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2_down.so $B/$v.so \
    --steps 16 > "$OUT/cmp_$v.log" 2>&1
  tail -1 "$OUT/cmp_$v.log"
done
timeout 90 python3 benchmarks/ab_decode.py $W/params $B/o2_down.so $B/pd_w20.so $B/pd_w24.so \
  --device cuda --rounds 8 --steps 128 --out "$OUT/ab_warps.md" >/dev/null 2>&1
tail -4 "$OUT/ab_warps.md"
