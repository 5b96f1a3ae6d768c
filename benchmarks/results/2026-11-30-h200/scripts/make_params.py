"""The random Llama-2-7B-shaped checkpoint of run_h200.py and its q4f16_1 conversion on the GPU,
in the work folder given (argv[1]); what determinism_probe.py makes when it runs first."""
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks/cuda")
from run_h200 import make_checkpoint  # noqa: E402

from mlcc.interface.convert_weight import convert_weight  # noqa: E402

work = Path(sys.argv[1])
if not (work / "params" / "ndarray-cache.json").is_file():
    make_checkpoint(work / "hf", 32)
    convert_weight(work / "hf", "q4f16_1", work / "params", device="cuda", progress=False)
