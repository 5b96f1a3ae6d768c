# Call 6: the default (pf.so), p1 and p0 (call 1, .device/bench_j) measured as run_h200.py
# measures decode (pipelined_ab.py: decode_greedy with the graph, 128 steps after 32 tokens,
# in turns, 20 rounds), in two processes, then each one's per-kernel breakdown (no graph).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_j
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for run in 1 2; do
  timeout 150 python3 benchmarks/results/2026-11-30-h200-h/scripts/pipelined_ab.py $W/params \
    $B/pf.so $B/p1.so $B/p0.so --rounds 20 > "$OUT/pab_$run.md" 2>&1
  head -6 "$OUT/pab_$run.md"
done
grep -A4 "^## " "$OUT/pab_2.md"
