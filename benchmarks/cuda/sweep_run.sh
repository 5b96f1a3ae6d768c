#!/bin/bash
# The O0..O3 sweep (python -m benchmarks) of the Llama-2-7B-shaped q4f16_1 model on one GPU of
# a machine without the TVM compiler. On the build machine first:
#   python benchmarks/cuda/prepare_device_run.py       # .device/site (runtime-only TVM), ...
#   python -m benchmarks build --model llama2_7b --device cuda --opt O0,O1,O2,O3 \
#       --max-batch-size 16 --out .device/prebuilt
#   mkdir -p .device/tokenizers && cp -r ../shared/tokenizers/llama2 .device/tokenizers/
# then, on the GPU machine from the repository root with .device/site, .device/prebuilt and
# .device/tokenizers carried: OUT=out bash benchmarks/cuda/sweep_run.sh
# (the random model borrows ../shared/tokenizers/llama2, which the libraries' chat config
# lists; a GPU machine without ../shared gets the carried copy there)
# The device tool returns at most 8 files, so the results folder and the children's logs come
# back as two archives: $OUT/sweep.tgz (README.md, results.json, summary.json, plots) and
# $OUT/logs.tgz.
set -u
OUT=${OUT:-/tmp/mlcc-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
if [ ! -d ../shared/tokenizers/llama2 ] && [ -d .device/tokenizers/llama2 ]; then
  mkdir -p ../shared/tokenizers && cp -r .device/tokenizers/llama2 ../shared/tokenizers/
fi
export MLCC_BENCH_CACHE=${MLCC_BENCH_CACHE:-/tmp/mlcc-bench} NCCL_NVLS_ENABLE=0
timeout "${SWEEP_TIMEOUT:-540}" python3 -m benchmarks run --model llama2_7b --device cuda \
  --prebuilt .device/prebuilt --opt O0,O1,O2,O3 --max-batch-size 16 --reference-steps 0 \
  --prompt-lengths 32,128,512 --decode-tokens 128 --gate-tokens 32 --repeats 3 --budget 15 \
  --child-timeout 300 --out /tmp/mlcc-sweep 2>&1 | tee "$OUT/sweep.log" | tail -40
tar czf "$OUT/sweep.tgz" -C /tmp/mlcc-sweep .
tar czf "$OUT/logs.tgz" --exclude='*.npy' --exclude='*.so' --exclude=params \
  -C "$MLCC_BENCH_CACHE/work" .
