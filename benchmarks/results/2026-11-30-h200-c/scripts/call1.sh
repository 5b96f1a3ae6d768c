# Call 1: the TMA GEMV standalone (validated sweep against the shipped picks), then in the 7B
# decode: logits against main's library, and an interleaved A/B of main, the TMA GEMVs, and
# the TMA GEMVs with the attention (and the GLU) releasing them at their start.
# Run from the repository root on the GPU machine with $OUT set.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 150 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma "$OUT/gemv_tma.json" \
  > "$OUT/gemv_tma.log" 2>&1
tail -25 "$OUT/gemv_tma.log"
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 120 python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/tma_att_glu.so \
  --steps 32 > "$OUT/cmp_tma.log" 2>&1
tail -4 "$OUT/cmp_tma.log"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/tma.so $B/tma_att.so \
  $B/tma_att_glu.so --device cuda --rounds 8 --steps 128 --out "$OUT/ab_tma.md"
tail -8 "$OUT/ab_tma.md"
