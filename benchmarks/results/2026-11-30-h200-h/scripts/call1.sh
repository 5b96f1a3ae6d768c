# Call 1: the down GEMV's copies held until its row is staged (build_down.py: p0 all of them,
# p1 all but the first; p0d4 all with 4 in flight, p0c16 in 2 chunks of 16 features) against
# the default (pf.so): logits, an interleaved A/B, and the step timelines of the default and
# p0 (build_gemv_timeline.py of 2026-11-30-h200-g, build_down_timeline.py).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_j
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in p0 p1 p0d4 p0c16; do
  timeout 50 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/$v.so \
    --steps 16 2>&1 | tail -1
done > "$OUT/cmp.log"
cat "$OUT/cmp.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/p0.so $B/p1.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_p.md" >/dev/null 2>&1
tail -4 "$OUT/ab_p.md"
for v in tg tg_p0; do
  timeout 50 python3 benchmarks/ab_decode.py $W/params $B/$v.so --device cuda \
    --rounds 1 --steps 128 > "$OUT/$v.log" 2>&1
  grep -c "^T[GA]" "$OUT/$v.log"
  gzip "$OUT/$v.log"
done
