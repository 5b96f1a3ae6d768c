# Call 6: the TMA GEMV for the qkv GEMV alone (the one the breakdown of call 5 found at 4.2 TB/s,
# placed while the norm ahead of it runs): interleaved A/B against main, then its breakdown.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W"
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/tma_qkv.so \
  --device cuda --rounds 16 --steps 128 --out "$OUT/ab_tma_qkv.md"
tail -4 "$OUT/ab_tma_qkv.md"
timeout 150 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/tma_qkv.so > "$OUT/breakdown_tma_qkv.txt" 2>&1
grep -v Warn "$OUT/breakdown_tma_qkv.txt" | head -10
