# Call 7: the new default (down on the TMA GEMV behind the GLU, 16 consumer warps; o2_down.so,
# build7b.py O2, byte-identical to call 6's pd_w16.so): the GPU parity and sampling tests on
# cases rebuilt from this code, the benchmark with the peer, then an A/B against the
# previous default (o2.so).
export MLCC_GPU_CASES=$PWD/.device/cases PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
timeout 200 python3 -m pytest tests/gpu/test_cuda_parity.py tests/gpu/test_cuda_sampling.py -q \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 200 python3 benchmarks/cuda/run_h200.py --lib $B/o2_down.so --work "$W" \
  --out "$OUT/o2_down" > "$OUT/o2_down.log" 2>&1
head -16 "$OUT/o2_down/decode_bench.md"
timeout 60 python3 benchmarks/ab_decode.py $W/params $B/o2.so $B/o2_down.so --device cuda \
  --rounds 8 --steps 128 --out "$OUT/ab_o2_down.md" >/dev/null 2>&1
tail -3 "$OUT/ab_o2_down.md"
