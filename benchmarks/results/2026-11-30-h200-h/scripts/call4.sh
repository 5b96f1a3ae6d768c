# Call 4 (libraries in .device/bench_k3, build_cfg.py): p1 (down:pre=1) again, and on top of
# it qkv's copies past its first 3 chunks held until its row is staged (p1k3: qkv:pre=3) or
# o_proj's past its first 2 (p1o2: oproj:pre=2), against the default (pf.so): logits and two
# interleaved A/Bs of 16 rounds.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_k3
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in p1k3 p1o2; do
  timeout 50 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/$v.so \
    --steps 16 2>&1 | tail -1
done > "$OUT/cmp.log"
cat "$OUT/cmp.log"
for v in p1k3 p1o2; do
  timeout 130 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/p1.so $B/$v.so \
    --device cuda --rounds 16 --steps 128 --out "$OUT/ab_$v.md" >/dev/null 2>&1
  tail -3 "$OUT/ab_$v.md"
done
