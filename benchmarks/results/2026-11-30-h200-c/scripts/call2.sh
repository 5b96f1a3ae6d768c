# Call 2: call 1 again with its two failures mended (the sweep no longer records "tma" variants
# in the database tables; three libraries an A/B, as four ran out of GPU memory).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 150 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma "$OUT/gemv_tma.json" \
  > "$OUT/gemv_tma.log" 2>&1
cat "$OUT/gemv_tma.log" | grep -v Warn | tail -25
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/tma.so \
  $B/tma_att_glu.so --device cuda --rounds 8 --steps 128 --out "$OUT/ab_tma.md"
tail -8 "$OUT/ab_tma.md"
