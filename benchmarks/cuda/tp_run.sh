#!/bin/bash
# Tensor parallelism on the GPU machine, from the repository root, after
# `python benchmarks/cuda/tp_run.py prepare` on the build machine (carry .device/site and
# .device/tp): the multi-GPU tests on the tiny models, then the Llama-2 benchmark, 1 GPU vs
# GPUS GPUs (2: 7B shape, 4: 13B shape). Results go to $OUT. STAGE=convert only makes the
# checkpoint and params (kept in /tmp/mlcc-tp), to split a long run over two calls; the default
# time limits (200 s tests + 360 s benchmark) fit one 10-minute call once the params exist.
set -u
OUT=${OUT:-/tmp/mlcc-out}
mkdir -p "$OUT"
# NVLink multicast stays off in everything started here (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/tp_env.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count(),
  "nccl", torch.cuda.nccl.version())' >> "$OUT/tp_env.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "${STAGE:-all}" != convert ]; then
  # pytest-timeout (installed there) prints where a test hangs instead of a silent kill
  MLCC_GPU_TP_CASES=$PWD/.device/tp/cases MLCC_TP_CALL_TIMEOUT=60 timeout \
    "${TEST_TIMEOUT:-200}" python3 -m pytest tests/gpu/test_tp_cuda.py -q -p no:cacheprovider \
    --timeout 90 --durations 0 2>&1 | grep -av '^frame #' | tee "$OUT/tp_tests.log" | tail -30
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/cuda/tp_run.py run --gpus "$GPUS" \
    --libs .device/tp/libs --work /tmp/mlcc-tp --out "$OUT" --stage "${STAGE:-all}" 2>&1 \
    | grep -av '^frame #' | tee "$OUT/tp_bench.log" | tail -40
fi
