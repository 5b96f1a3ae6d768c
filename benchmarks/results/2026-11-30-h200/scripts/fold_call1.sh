set -x
. "$(dirname "$0")/env.sh"
python3 benchmarks/cuda/determinism_probe.py $B/fold.so --work $W > $OUT/det_fold.log 2>&1
tail -3 $OUT/det_fold.log
python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/fold.so > $OUT/cmp_fold.log 2>&1
tail -2 $OUT/cmp_fold.log
python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/fold_early.so > $OUT/cmp_fold_early.log 2>&1
tail -2 $OUT/cmp_fold_early.log
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/fold.so $B/fold_early.so --device cuda --rounds 30 --steps 128 --out $OUT/ab_16.md
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/fold.so $B/fold_early.so --device cuda --rounds 10 --steps 64 --prompt 960 --out $OUT/ab_960.md
python3 benchmarks/cuda/determinism_probe.py $B/fold_early.so --work $W > $OUT/det_fold_early.log 2>&1
tail -2 $OUT/det_fold_early.log
