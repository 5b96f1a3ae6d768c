# Call 11: the benchmark (run_h200.py) on the default 7B library built from the final
# code (o2_glu.so: build7b.py O2, md5 3ab1a80b, byte-identical to call 9's glu2.so) and, in the
# same call, on the library of the figure of record (n_bounded.so) without the peer.
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/env.txt"
timeout 330 python3 benchmarks/cuda/run_h200.py --lib .device/bench/o2_glu.so \
  --work /tmp/mlcc-bench --out "$OUT/o2_glu" > "$OUT/o2_glu.log" 2>&1
head -16 "$OUT/o2_glu/decode_bench.md"
timeout 250 python3 benchmarks/cuda/run_h200.py --lib .device/bench/n_bounded.so --skip-peer \
  --work /tmp/mlcc-bench --out "$OUT/n_bounded" > "$OUT/n_bounded.log" 2>&1
head -16 "$OUT/n_bounded/decode_bench.md"
