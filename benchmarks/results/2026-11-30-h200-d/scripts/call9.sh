# Call 9: the gate_up + silu_mul GEMV behind the second norm on the TMA GEMV's GLU mode (a ring
# of slots): validated standalone sweep beside the shipped GLU GEMV; the 7B library's logits
# against the default's; an interleaved A/B of the default and the GLU mode at 3 and 2 chunks
# in flight.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 120 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma_glu \
  "$OUT/gemv_tma_glu.json" > "$OUT/gemv_tma_glu.log" 2>&1
grep -v Warn "$OUT/gemv_tma_glu.log" | tail -7
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 100 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2_tma.so $B/glu3.so \
  --steps 32 > "$OUT/cmp_glu3.log" 2>&1
tail -1 "$OUT/cmp_glu3.log"
timeout 220 python3 benchmarks/ab_decode.py $W/params $B/o2_tma.so $B/glu3.so $B/glu2.so \
  --device cuda --rounds 16 --steps 128 --out "$OUT/ab_glu.md"
tail -4 "$OUT/ab_glu.md"
