#!/bin/bash
# Nsight Compute on chosen GEMV sweep kernels, on the GPU machine from the repository root:
#   OUT=out bash benchmarks/cuda/ncu_gemv.sh .device/sweep:gemv_22016_4096_tc_w8_t1_u1 ...
# Each FOLDER:NAME is a variant of a `gemv_sweep.py build FOLDER` library; its report (the
# speed-of-light, occupancy, launch, scheduler, warp-state and memory sections of one launch,
# clocks left alone) lands in $OUT/ncu.tgz as ncu_NAME.txt.
set -u
OUT=${OUT:-/tmp/mlcc-out}
R=/tmp/mlcc-ncu
mkdir -p "$OUT" "$R"
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
for pair in "$@"; do
  folder=${pair%%:*} name=${pair##*:}
  timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none -k "regex:${name}" \
    --launch-skip 4 --launch-count 1 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SourceCounters \
    python3 benchmarks/cuda/gemv_sweep.py profile "$folder" "$name" > "$R/ncu_$name.txt" 2>&1
  echo "== $name (exit $?)"
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Warp Per Scheduler|No Eligible" \
    "$R/ncu_$name.txt" | head -8
  tar czf "$OUT/ncu.tgz" -C "$R" .
done
