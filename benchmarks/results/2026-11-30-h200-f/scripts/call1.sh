# Call 1: consumer warps of the TMA GEMVs. The tma_warps sweep set (validated standalone
# timings beside the database's picks), then in the 7B decode step: the logits of each variant
# against the default (o2.so, build7b.py O2), per-kernel breakdowns, and two interleaved A/Bs:
# qkv and o_proj at 16 warps (l16: 1 K slice x 16 teams; l16k2: 2 x 8), down at 24 and 20 warps.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_f
timeout 120 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma_warps \
  "$OUT/gemv_tma_warps.json" > "$OUT/gemv_tma_warps.log" 2>&1
grep -v Warn "$OUT/gemv_tma_warps.log" | tail -16
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in l16 l16k2 d24 d20; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2.so $B/$v.so \
    --steps 16 > "$OUT/cmp_$v.log" 2>&1
  echo "$v: $(tail -1 "$OUT/cmp_$v.log")"
done
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/l16.so $B/l16k2.so \
  --device cuda --rounds 8 --steps 128 --out "$OUT/ab_light.md" >/dev/null 2>&1
tail -4 "$OUT/ab_light.md"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/d24.so $B/d20.so \
  --device cuda --rounds 8 --steps 128 --out "$OUT/ab_down.md" >/dev/null 2>&1
tail -4 "$OUT/ab_down.md"
timeout 150 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/o2.so $B/l16.so $B/l16k2.so $B/d24.so $B/d20.so > "$OUT/breakdown.txt" 2>&1
grep "^##\|k13_\|k15_\|k18_" "$OUT/breakdown.txt"
