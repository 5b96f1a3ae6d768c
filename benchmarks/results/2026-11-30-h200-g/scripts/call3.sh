# Call 3: the first rotary pair's frequency read first in the kernel and its cosine and sine
# computed before the wait (a1s0.so) or after it (a2s0.so), no staged round (build_attn2.py
# OUT 1|2 0), and a1s0 with the lane groups of a warp merged through shuffles first (a1m.so,
# decode_attention.WARP_MERGE) against the default (pf.so): logits, an interleaved A/B, and
# the phase timelines of a1s0 and a1m (build_timeline.py OUT 1 0, without and with WARP_MERGE).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_h
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in e1s0 a1s0 a1m; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/$v.so \
    --steps 16 2>&1 | tail -1
done > "$OUT/cmp.log"
cat "$OUT/cmp.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/a1s0.so $B/a1m.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_a1.md" >/dev/null 2>&1
tail -4 "$OUT/ab_a1.md"
timeout 100 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/a2s0.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_a2.md" >/dev/null 2>&1
tail -3 "$OUT/ab_a2.md"
for v in a1s0 a1m; do
  timeout 60 python3 benchmarks/ab_decode.py $W/params $B/tl_$v.so --device cuda --rounds 1 \
    --steps 128 > "$OUT/tl_${v}_16.log" 2>&1
done
