set -x
. "$(dirname "$0")/env.sh"
python3 benchmarks/cuda/determinism_probe.py $B/p_all.so --work $W > $OUT/det_p_all.log 2>&1
tail -1 $OUT/det_p_all.log
python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/p_all.so > $OUT/cmp_p_all.log 2>&1
tail -1 $OUT/cmp_p_all.log
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/p_qkv.so $B/p_all.so --device cuda --rounds 30 --steps 128 --out $OUT/ab_p.md
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/p_qkv4.so $B/p_qkv.so --device cuda --rounds 20 --steps 128 --out $OUT/ab_p4.md
python3 $S/breakdown.py $W/params $B/p_all.so $B/p_qkv.so > $OUT/breakdown.txt 2>&1
grep -v Warn $OUT/breakdown.txt | head -24
