# Call 4: call 3's four-library A/B ran out of GPU memory (four 7B engines), so the release
# variants again, three libraries a process and a 32-token prompt as run_h200.py's: fold.so
# (ad872242), fold_g.so (o_proj releases the GLU GEMV at its start, 0fe32fa2), fold_q.so (down
# releases qkv at its start, d2bc38c4), fold_qg.so (both, ca37de6a; build_fold_release.py
# qkv,glu); then the benchmark (run_h200.py) of fold_g.so.
export OUT
. benchmarks/results/2026-11-30-h200/scripts/env.sh
cp "$OUT/env.txt" "$OUT/call4_env.txt"
B=.device/bench_s
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" > /dev/null 2>&1
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/fold.so $B/fold_g.so $B/fold_q.so \
  --device cuda --pipelined --rounds 20 --steps 128 --prompt 32 > "$OUT/call4_pab_rel.md" 2>&1
tail -4 "$OUT/call4_pab_rel.md"
timeout 120 python3 benchmarks/ab_decode.py $W/params $B/fold_g.so $B/fold_qg.so $B/fold.so \
  --device cuda --pipelined --rounds 20 --steps 128 --prompt 32 > "$OUT/call4_pab_rel2.md" 2>&1
tail -4 "$OUT/call4_pab_rel2.md"
timeout 330 python3 benchmarks/cuda/run_h200.py --lib $B/fold_g.so --work "$W" \
  --out "$OUT/fold_g" > "$OUT/fold_g.log" 2>&1
head -16 "$OUT/fold_g/decode_bench.md"
