# Call 3: the two depth-limited placements that were not slower, together: qkv (chunks of 8,
# depth 3) and o_proj (chunks of 8, depth 2, released at the decode attention's start); logits
# against main's library, then two interleaved A/Bs with more rounds.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 100 python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/qo.so \
  --steps 32 > "$OUT/cmp_qo.log" 2>&1
tail -1 "$OUT/cmp_qo.log"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/qkv_c8d3.so $B/qo.so \
  --device cuda --rounds 16 --steps 128 --out "$OUT/ab_qo.md"
tail -4 "$OUT/ab_qo.md"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/o_att_c8d2.so $B/qo.so \
  --device cuda --rounds 16 --steps 128 --out "$OUT/ab_qo2.md"
tail -4 "$OUT/ab_qo2.md"
