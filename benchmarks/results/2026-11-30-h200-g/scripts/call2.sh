# Call 2: the decode attention computing its first rotary angle before its wait (e1s0.so) and
# also copying its second round of cached positions into shared memory then (e1s1.so), both
# build_attn2.py, against the current default (pf.so, md5 de174a90): logits, interleaved A/Bs
# after a 16-token and a 960-token prompt, and e1s1's phase timeline (tl_e1s1.so,
# build_timeline.py with the two on).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_h
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/e1s1.so \
  --steps 16 > "$OUT/cmp_e1s1.log" 2>&1
tail -1 "$OUT/cmp_e1s1.log"
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/e1s0.so $B/e1s1.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_attn2.md" >/dev/null 2>&1
tail -4 "$OUT/ab_attn2.md"
timeout 80 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/e1s1.so \
  --device cuda --rounds 4 --steps 64 --prompt 960 --out "$OUT/ab_attn2_960.md" >/dev/null 2>&1
tail -3 "$OUT/ab_attn2_960.md"
timeout 60 python3 benchmarks/ab_decode.py $W/params $B/tl_e1s1.so --device cuda --rounds 1 \
  --steps 128 > "$OUT/tl_e1s1_16.log" 2>&1
grep -c "^TL" "$OUT/tl_e1s1_16.log"
