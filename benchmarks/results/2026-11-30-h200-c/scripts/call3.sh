# Call 3: the one-shot GEMV loading its activation row ahead of its weights (row_first),
# standalone (validated sweep beside the database's picks) and in the 7B decode (interleaved
# A/B: main, row_first for o_proj and down, for down alone), then the logits against main's.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 150 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_rf "$OUT/gemv_rf.json" \
  > "$OUT/gemv_rf.log" 2>&1
grep -v Warn "$OUT/gemv_rf.log" | tail -25
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/rf.so \
  $B/rf_down.so --device cuda --rounds 10 --steps 128 --out "$OUT/ab_rf.md"
tail -5 "$OUT/ab_rf.md"
timeout 100 python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/rf.so \
  --steps 32 > "$OUT/cmp_rf.log" 2>&1
tail -1 "$OUT/cmp_rf.log"
