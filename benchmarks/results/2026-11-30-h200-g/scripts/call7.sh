# Call 7: the step's timeline over 8 layers of the 61st decode step after a 16-token prompt:
# the qkv, o_proj and down TMA GEMVs and the decode attention (tg.so,
# build_gemv_timeline.py).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/ab_decode.py $W/params .device/bench_l/tg.so --device cuda \
  --rounds 1 --steps 128 > "$OUT/tg_16.log" 2>&1
grep -c "^T[GA]" "$OUT/tg_16.log"
