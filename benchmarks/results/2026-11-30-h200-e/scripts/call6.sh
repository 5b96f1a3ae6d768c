# Call 6: the down GEMV on the TMA GEMV released when the GLU ends (build_down_probe.py), its
# copies alone (pd_stream: a timing probe with wrong results) and with 16 consumer warps
# (pd_w16, pd_w16d3): per-kernel breakdowns against the default, then a short A/B.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in pd_d2 pd_w16; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/$v.so \
    --steps 16 > "$OUT/cmp_$v.log" 2>&1
  tail -1 "$OUT/cmp_$v.log"
done
timeout 200 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/o2.so $B/pd_d2.so $B/pd_stream.so $B/pd_w16.so $B/pd_w16d3.so > "$OUT/breakdown.txt" 2>&1
grep "^##\|linear_silu_mul \|k18_" "$OUT/breakdown.txt"
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/pd_d2.so $B/pd_w16.so \
  --device cuda --rounds 8 --steps 128 --out "$OUT/ab_pd.md" >/dev/null 2>&1
tail -4 "$OUT/ab_pd.md"
