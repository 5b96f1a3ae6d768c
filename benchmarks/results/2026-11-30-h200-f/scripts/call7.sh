# Call 7: the decode attention loading the query and the new token's key and value in one
# round trip (stage.so: PREFETCH_ROUNDS = 0) and also bringing its next two rounds of cached
# positions into L2 while it waits (pf.so: the default after this call), both built with
# build7b.py O2 (stage.so with decode_attention.PREFETCH_ROUNDS set to 0), against the
# current default (o2_attn.so): logits, then interleaved A/Bs.
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_g
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/cuda/compare_libs.py $W/params $B/o2_attn.so $B/pf.so \
  --steps 16 > "$OUT/cmp_pf.log" 2>&1
tail -1 "$OUT/cmp_pf.log"
timeout 100 python3 benchmarks/ab_decode.py $W/params $B/o2_attn.so $B/stage.so $B/pf.so \
  --device cuda --rounds 8 --steps 128 --out "$OUT/ab_pf.md" >/dev/null 2>&1
tail -4 "$OUT/ab_pf.md"
timeout 60 python3 benchmarks/ab_decode.py $W/params $B/o2_attn.so $B/pf.so \
  --device cuda --rounds 4 --steps 64 --prompt 960 --out "$OUT/ab_pf_960.md" >/dev/null 2>&1
tail -3 "$OUT/ab_pf_960.md"
