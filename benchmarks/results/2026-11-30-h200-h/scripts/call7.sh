# Call 7: variants of this session and of 2026-11-30-h200-g that the host-synchronous A/Bs
# (ab_decode.py, about 3% between runs) could not tell from the default, measured with
# pipelined_ab.py (20 rounds, no breakdown), three libraries a process, the default first.
# From h200-g (md5 there): a1m, a1s0, a2s0 (.device/bench_h), a1m_d3, pf_d4 (bench_i), rq_m
# (bench_k); from this session: p1o2 (call 4), p1c16 (call 3). All in .device/bench_p.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_p
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for g in "a1m a1s0" "a1m_d3 rq_m" "pf_d4 p1o2" "p1c16 a2s0"; do
  set -- $g
  timeout 100 python3 benchmarks/results/2026-11-30-h200-h/scripts/pipelined_ab.py $W/params \
    $B/pf.so $B/$1.so $B/$2.so --rounds 20 --no-breakdown > "$OUT/pab_$1.md" 2>&1
  tail -3 "$OUT/pab_$1.md"
done
