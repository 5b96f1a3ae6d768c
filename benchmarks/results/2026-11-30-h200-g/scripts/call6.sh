# Call 6: the qkv TMA GEMV releasing the decode attention at its start (build_qkv_early.py),
# with the attention of a1m (early angles, warp merges: 5,188 bytes of shared memory, which
# fit beside the qkv GEMV's block; rq_m.so) and with the default's (9.3 KB, which do not;
# rq_pf.so), against the default (pf.so): logits and an interleaved A/B.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_k
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/pf.so $B/rq_m.so \
  --steps 16 > "$OUT/cmp_rq_m.log" 2>&1
tail -1 "$OUT/cmp_rq_m.log"
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/rq_m.so $B/rq_pf.so \
  --device cuda --rounds 12 --steps 128 --out "$OUT/ab_rq.md" >/dev/null 2>&1
tail -4 "$OUT/ab_rq.md"
