# Call 2: the norms releasing their TMA GEMV after their loads (norm_mid.so) or after their sum
# of squares (norm_late.so) instead of right after their wait (the default, o2.so).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in mid late; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/norm_$v.so \
    --steps 16 > "$OUT/cmp_norm_$v.log" 2>&1
  tail -1 "$OUT/cmp_norm_$v.log"
done
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/norm_mid.so $B/norm_late.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_norm_late.md" >/dev/null 2>&1
tail -4 "$OUT/ab_norm_late.md"
