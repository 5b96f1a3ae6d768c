export PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/env.txt
B=.device/bench
W=/tmp/mlcc-bench
python3 - <<'PY'
from pathlib import Path
import sys
sys.path.insert(0, "benchmarks/cuda")
from run_h200 import make_checkpoint
from mlcc.interface.convert_weight import convert_weight
w = Path("/tmp/mlcc-bench")
make_checkpoint(w / "hf", 32)
convert_weight(w / "hf", "q4f16_1", w / "params", device="cuda", progress=False)
PY
python3 benchmarks/cuda/compare_libs.py $W/params $B/n_bounded.so $B/rowcopy.so --steps 16 > $OUT/cmp_rowcopy.log 2>&1
tail -1 $OUT/cmp_rowcopy.log
python3 benchmarks/ab_decode.py $W/params $B/n_bounded.so $B/rowcopy.so --device cuda --rounds 20 --steps 128 --out $OUT/ab_rowcopy.md
