# Call 4: how fast bulk copies into shared memory read the decode GEMVs' weights at all (the
# TMA GEMV's copies alone, one block an SM, every chunk issued at once), beside the read
# ceiling of 128-bit loads (read_ceiling.py) and the shipped GEMVs, in the same call.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 120 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tmas "$OUT/gemv_tma_stream.json" \
  > "$OUT/gemv_tma_stream.log" 2>&1
grep -v Warn "$OUT/gemv_tma_stream.log" | tail -8
timeout 120 python3 benchmarks/cuda/read_ceiling.py run .device/ceiling "$OUT/read_ceiling.json" \
  > "$OUT/read_ceiling.log" 2>&1
grep -v Warn "$OUT/read_ceiling.log" | tail -12
