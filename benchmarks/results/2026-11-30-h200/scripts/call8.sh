. "$(dirname "$0")/env.sh"
python3 "$S/make_params.py" "$W"
python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/rowcopy.so --steps 16 > $OUT/cmp_rowcopy.log 2>&1
tail -1 $OUT/cmp_rowcopy.log
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/rowcopy.so --device cuda --rounds 20 --steps 128 --out $OUT/ab_rowcopy.md
