# Call 2: p0d4 and p0c16 (call 1) against the default in an interleaved A/B.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_j
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/p0d4.so $B/p0c16.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_pd.md" >/dev/null 2>&1
tail -4 "$OUT/ab_pd.md"
