# Call 4: the o_proj TMA GEMV with more chunks of copies in flight (3 or 4 of its 4; the
# default 2) behind the decode attention with early angles and warp merges (a1m_d3, a1m_d4:
# build_oproj.py OUT DEPTH 1 1), and behind the default attention (pf_d4: build_oproj.py OUT 4
# 0 0), against the default (pf.so) and a1m (call 3): logits and two interleaved A/Bs.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_i
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
for v in a1m_d4 pf_d4; do
  timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/$v.so \
    --steps 16 2>&1 | tail -1
done > "$OUT/cmp.log"
cat "$OUT/cmp.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/a1m_d3.so $B/a1m_d4.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_depth.md" >/dev/null 2>&1
tail -4 "$OUT/ab_depth.md"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/pf_d4.so $B/a1m.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_depth_pf.md" >/dev/null 2>&1
tail -4 "$OUT/ab_depth_pf.md"
