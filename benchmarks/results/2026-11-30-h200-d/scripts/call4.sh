# Call 4: the GPU parity tests on cases built from the final code (the TMA GEMV now on at O2),
# with the sampling tests, as device_run.sh runs them.
export MLCC_GPU_CASES=$PWD/.device/cases PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
timeout 400 python3 -m pytest tests/gpu/test_cuda_parity.py tests/gpu/test_cuda_sampling.py -q \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -5 "$OUT/gpu_tests.log"
