# Call 4: the decode attention with 8 warps, one block a head up to 160 positions and at most
# 4, 8 or 16 splits (a8_s4, a8_s8, a8_s16; build_attn.py 8 4 S 160): logits against the
# default, A/Bs after a 16-token prompt and after 3,968 (where fewer splits walk more rounds).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_f
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in a8_s8 a8_s16; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/$v.so \
    --steps 16 > "$OUT/cmp_$v.log" 2>&1
  echo "$v: $(tail -1 "$OUT/cmp_$v.log")"
done
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/a8_s8.so $B/a8_s16.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_a8.md" >/dev/null 2>&1
tail -4 "$OUT/ab_a8.md"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/a8_s4.so $B/a8_s16.so \
  --device cuda --rounds 4 --steps 32 --prompt 3968 --out "$OUT/ab_a8_3968.md" >/dev/null 2>&1
tail -4 "$OUT/ab_a8_3968.md"
