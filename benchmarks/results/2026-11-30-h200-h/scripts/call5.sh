# Call 5 (libraries in .device/bench_k4, build_cfg.py): the one-row norms releasing the GEMV
# after them at their start (n0: --norm-early; n1: also qkv's copies past its first chunk held
# until its row is staged, qkv:pre=1), against the default (pf.so): logits and an
# interleaved A/B of 16 rounds.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_k4
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in n0 n1; do
  timeout 50 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/$v.so \
    --steps 16 2>&1 | tail -1
done > "$OUT/cmp.log"
cat "$OUT/cmp.log"
timeout 130 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/n0.so $B/n1.so \
  --device cuda --rounds 16 --steps 128 --out "$OUT/ab_n.md" >/dev/null 2>&1
tail -3 "$OUT/ab_n.md"
