# Call 2: timing probes (build_probe.py; wrong results): the decode step without its 64
# add_rms_norm kernels (nonorm), with a decode attention that returns after its wait (noattn),
# and both, each against the default (o2.so) in interleaved A/Bs.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_f
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 200 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/p_nonorm.so $B/p_noattn.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_probe.md" >/dev/null 2>&1
tail -4 "$OUT/ab_probe.md"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/p_both.so \
  --device cuda --rounds 10 --steps 128 --out "$OUT/ab_probe_both.md" >/dev/null 2>&1
tail -3 "$OUT/ab_probe_both.md"
timeout 150 python3 benchmarks/results/2026-11-30-h200/scripts/breakdown.py $W/params \
  $B/o2.so $B/p_nonorm.so $B/p_both.so > "$OUT/breakdown.txt" 2>&1
grep -v Warn "$OUT/breakdown.txt" | grep "^##\|k1[3-8]_"
