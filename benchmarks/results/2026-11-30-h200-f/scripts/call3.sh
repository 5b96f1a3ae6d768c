# Call 3: block shapes of the decode attention (build_attn.py WARPS UNROLL MAX_SPLITS SOLO):
# a4_solo160 (4 4 32 160: one block a head up to 160 positions, no merge), a8_s4 (8 4 4 160),
# a16_s2 (16 4 2 256). Logits against the default, then interleaved A/Bs after a 16-token
# prompt (the issue's range of positions) and after 960.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_f
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in a4_solo160 a8_s4 a16_s2; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/$v.so \
    --steps 16 > "$OUT/cmp_$v.log" 2>&1
  echo "$v: $(tail -1 "$OUT/cmp_$v.log")"
done
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/a4_solo160.so $B/a8_s4.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_attn.md" >/dev/null 2>&1
tail -4 "$OUT/ab_attn.md"
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/a16_s2.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_attn16.md" >/dev/null 2>&1
tail -3 "$OUT/ab_attn16.md"
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/a8_s4.so $B/a16_s2.so \
  --device cuda --rounds 6 --steps 64 --prompt 960 --out "$OUT/ab_attn_960.md" >/dev/null 2>&1
tail -4 "$OUT/ab_attn_960.md"
