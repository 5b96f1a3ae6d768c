# Call 6 (same machine as call 5): the new default against the previous one after 960 positions.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_g
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/o2_attn.so \
  --device cuda --rounds 6 --steps 64 --prompt 960 --out "$OUT/ab_960.md" >/dev/null 2>&1
tail -3 "$OUT/ab_960.md"
