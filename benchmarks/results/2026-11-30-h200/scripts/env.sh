# Sourced by every call script (run from the repository root on the GPU machine, with $OUT):
# the runtime-only TVM, the machine's description, the libraries' folder B (the carried
# .device/bench) and the work folder W (checkpoint and parameters; $WORK or the temp folder).
export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/env.txt"
python3 -c "import torch; print(torch.__version__)" >> "$OUT/env.txt"
S=$(dirname "${BASH_SOURCE[0]}")
B=.device/bench
W=${WORK:-$(python3 -c "import tempfile; print(tempfile.gettempdir())")/mlcc-bench}
