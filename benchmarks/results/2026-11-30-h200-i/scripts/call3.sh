# Call 3: the pipelined A/B of the new O2 default (pf.so, md5 3de31c57), the folded norms
# (fold.so, --opt "O2;fold_norms=1", ad872242) and two release variants of it built by
# build_fold_release.py (fold_q.so: down releases qkv at its start, d2bc38c4; fold_g.so: o_proj
# releases the GLU GEMV at its start, 0fe32fa2); the fold against pf again in the other order;
# then the benchmark (run_h200.py) of fold.so.
export OUT
. benchmarks/results/2026-11-30-h200/scripts/env.sh
cp "$OUT/env.txt" "$OUT/call3_env.txt"
B=.device/bench_s
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" > /dev/null 2>&1
timeout 150 python3 benchmarks/ab_decode.py $W/params $B/pf.so $B/fold.so $B/fold_q.so \
  $B/fold_g.so --device cuda --pipelined --rounds 20 --steps 128 > "$OUT/call3_pab_rel.md" 2>&1
tail -5 "$OUT/call3_pab_rel.md"
timeout 100 python3 benchmarks/ab_decode.py $W/params $B/fold.so $B/pf.so --device cuda \
  --pipelined --rounds 20 --steps 128 > "$OUT/call3_pab_fold_first.md" 2>&1
tail -3 "$OUT/call3_pab_fold_first.md"
timeout 330 python3 benchmarks/cuda/run_h200.py --lib $B/fold.so --work "$W" \
  --out "$OUT/fold" > "$OUT/fold.log" 2>&1
head -16 "$OUT/fold/decode_bench.md"
