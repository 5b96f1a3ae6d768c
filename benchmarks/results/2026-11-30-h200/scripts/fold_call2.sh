set -x
. "$(dirname "$0")/env.sh"
python3 benchmarks/cuda/determinism_probe.py $B/fold2.so --work $W > $OUT/det_fold2.log 2>&1
tail -1 $OUT/det_fold2.log
python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/fold2.so > $OUT/cmp_fold2.log 2>&1
tail -1 $OUT/cmp_fold2.log
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/fold2.so $B/fold2_early.so --device cuda --rounds 30 --steps 128 --out $OUT/ab_16.md
python3 $S/breakdown.py $W/params $B/n_bounded.so $B/fold2.so > $OUT/breakdown.txt 2>&1
head -30 $OUT/breakdown.txt
grep -A30 "fold2.so" $OUT/breakdown.txt | head -30
