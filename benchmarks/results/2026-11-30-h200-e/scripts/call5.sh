# Call 5: the down GEMV on the TMA GEMV behind the GLU, which releases it at its start
# (build_down_tma.py: default_config = 4 K slices x 2 teams, chunks of 8, 2 in flight; c4d3:
# chunks of 4, 3 in flight; d0: every chunk issued before the wait) against the default.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in down_d2 down_c4d3 down_d0; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/$v.so \
    --steps 16 > "$OUT/cmp_$v.log" 2>&1
  tail -1 "$OUT/cmp_$v.log"
done
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/down_d2.so $B/down_c4d3.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_down.md" >/dev/null 2>&1
tail -4 "$OUT/ab_down.md"
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/down_d0.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_down_d0.md" >/dev/null 2>&1
tail -3 "$OUT/ab_down_d0.md"
timeout 120 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/o2.so $B/down_d2.so > "$OUT/breakdown.txt" 2>&1
grep -v Warn "$OUT/breakdown.txt" | grep -v "Memcpy\|embedding\|last_logits\| rms_norm "
