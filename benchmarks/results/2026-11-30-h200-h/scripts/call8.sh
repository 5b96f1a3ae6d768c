# Call 8 (the machine still warm from call 7, its parameters in $W): rq_m against the default
# once more in a process of their own, rq_m first.
. benchmarks/results/2026-11-30-h200/scripts/env.sh; ls $W/params/ndarray-cache.json && timeout 90 python3 benchmarks/results/2026-11-30-h200-h/scripts/pipelined_ab.py $W/params .device/bench_p/rq_m.so .device/bench_p/pf.so --rounds 20 --no-breakdown > "$OUT/pab_rq_m_2.md" 2>&1; tail -3 "$OUT/pab_rq_m_2.md"
