# Call 3 (libraries in .device/bench_k2, built by build_cfg.py): down with its first chunk
# issued before the staging and the rest after it (p1: down:pre=1; p1c16: the same in chunks
# of 16 features), and with qkv's consumer warps taking two features a chunk (p1q16:
# qkv:chunk=16; p1q16d2: also 2 chunks in flight), against the default (pf.so): logits, two
# interleaved A/Bs, and the step timelines of p1 and p1q16 (build_cfg.py --timeline).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_k2
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in p1q16 p1q16d2 p1c16; do
  timeout 50 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/$v.so \
    --steps 16 2>&1 | tail -1
done > "$OUT/cmp.log"
cat "$OUT/cmp.log"
timeout 100 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/p1.so $B/p1q16.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_q.md" >/dev/null 2>&1
tail -3 "$OUT/ab_q.md"
timeout 100 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/p1q16d2.so $B/p1c16.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_c.md" >/dev/null 2>&1
tail -3 "$OUT/ab_c.md"
for v in tg_p1 tg_p1q16; do
  timeout 50 python3 benchmarks/ab_decode.py $W/params $B/$v.so --device cuda \
    --rounds 1 --steps 128 > "$OUT/$v.log" 2>&1
  grep -c "^T[GA]" "$OUT/$v.log"
  gzip "$OUT/$v.log"
done
