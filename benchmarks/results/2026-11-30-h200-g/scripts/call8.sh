# Call 8: the default (pf.so) with its CUDA context preferring shared memory
# (prefer_shared.py) against itself without, in turns (separate processes: the setting is the
# context's), then the step timeline (tg.so) with it.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_m
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
A="$W/params $B/pf.so --device cuda --rounds 5 --steps 128"
for r in 1 2; do
  timeout 25 python3 benchmarks/ab_decode.py $A > "$OUT/off_$r.md" 2>&1
  timeout 25 python3 benchmarks/results/2026-11-30-h200-g/scripts/prefer_shared.py benchmarks/ab_decode.py \
    $A > "$OUT/on_$r.md" 2>&1
  grep -h "pf.so |" "$OUT/off_$r.md" "$OUT/on_$r.md"
done
grep -h PREFER "$OUT/on_1.md"
timeout 25 python3 benchmarks/results/2026-11-30-h200-g/scripts/prefer_shared.py benchmarks/ab_decode.py \
  $W/params $B/tg.so --device cuda --rounds 1 --steps 128 > "$OUT/tg_pref.log" 2>&1
grep -c "^T[GA]" "$OUT/tg_pref.log"
