set -x
. "$(dirname "$0")/env.sh"
python3 benchmarks/cuda/determinism_probe.py $B/glu_early2.so --work $W > $OUT/det_glu_early2.log 2>&1
tail -1 $OUT/det_glu_early2.log
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/glu_early3.so $B/glu_early2.so --device cuda --rounds 30 --steps 128 --out $OUT/ab_glu.md
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/base_wt.so $B/fold2_early.so --device cuda --rounds 20 --steps 128 --out $OUT/ab_base_wt.md
python3 $S/breakdown.py $W/params $B/glu_early3.so $B/glu_early2.so > $OUT/breakdown.txt 2>&1
grep -v Warn $OUT/breakdown.txt | head -24
