set -x
. "$(dirname "$0")/env.sh"
python3 "$S/make_params.py" "$W"
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/nostage_down.so $B/nostage_all.so --device cuda --rounds 30 --steps 128 --out $OUT/ab_nostage.md
python3 $S/breakdown.py $W/params $B/n_bounded.so $B/nostage_all.so > $OUT/breakdown.txt 2>&1
grep -v Warn $OUT/breakdown.txt | head -30
