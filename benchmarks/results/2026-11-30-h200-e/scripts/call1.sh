# Call 1: the norms ahead of a TMA GEMV releasing it at their start (norm_start.so; with qkv 4
# and GLU 3 chunks in flight: norm_start_d43.so) against the default (o2.so, md5 3ab1a80b):
# logits, a batch-1 A/B, then batch-16 decode of the default against n_bounded (md5 fb468da1).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/norm_start.so \
  --steps 16 > "$OUT/cmp_norm_start.log" 2>&1
tail -1 "$OUT/cmp_norm_start.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/norm_start.so \
  $B/norm_start_d43.so --device cuda --rounds 12 --steps 128 --out "$OUT/ab_norm_start.md" \
  >/dev/null 2>&1
tail -4 "$OUT/ab_norm_start.md"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/n_bounded.so --batch 16 \
  --device cuda --rounds 10 --steps 64 --out "$OUT/ab_batch16.md" >/dev/null 2>&1
tail -3 "$OUT/ab_batch16.md"
