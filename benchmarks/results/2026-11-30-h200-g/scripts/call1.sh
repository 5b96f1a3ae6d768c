# Call 1: the GPU parity and sampling tests on cases rebuilt from main (the decode attention
# with its L2 prefetch), then the decode attention's phase timeline (tl.so, build_timeline.py)
# after a 16-token prompt (positions 40, 100, 140) and a 960-token one (position 1000).
export MLCC_GPU_CASES=$PWD/.device/cases PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
timeout 150 python3 -m pytest tests/gpu/test_cuda_parity.py tests/gpu/test_cuda_sampling.py -q \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
. benchmarks/results/2026-11-30-h200/scripts/env.sh
B=.device/bench_g
python3 benchmarks/results/2026-11-30-h200/scripts/make_params.py "$W" >/dev/null 2>&1
timeout 60 python3 benchmarks/ab_decode.py $W/params $B/tl.so --device cuda --rounds 1 \
  --steps 128 > "$OUT/tl_16.log" 2>&1
timeout 60 python3 benchmarks/ab_decode.py $W/params $B/tl.so --device cuda --rounds 1 \
  --steps 48 --prompt 960 > "$OUT/tl_960.log" 2>&1
grep -c "^TL" "$OUT/tl_16.log" "$OUT/tl_960.log"
