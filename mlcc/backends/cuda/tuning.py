"""Tuned launch parameters of the q4 decode GEMV, read from the database shipped with mlcc.

`gemv_tuning.json` (next to this file) maps "N,K" (output features, input features) to the
block shape that `benchmarks/cuda/gemv_sweep.py` measured fastest on a GPU after validating it
against a reference; it records the device, the date and every variant's time. Shapes not in it
get the heuristic: eight warps per block and as many features per warp as keep a lane's weight
loads (issued together) at 16 or fewer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATABASE = Path(__file__).with_name("gemv_tuning.json")


@lru_cache(maxsize=1)
def _records() -> dict[str, dict]:
    if not DATABASE.is_file():
        return {}
    return json.loads(DATABASE.read_text()).get("best", {})


def heuristic(n: int, k: int) -> tuple[int, int, str]:
    iters = -(-(k // 32) // 32)
    return 8, max(1, min(4, 16 // iters)), "mlcc_q4_dot8"


def gemv_config(n: int, k: int) -> tuple[int, int, str]:
    """(warps per block, output features per warp, nibble dot function) for N x K."""
    record = _records().get(f"{n},{k}")
    if record is None:
        return heuristic(n, k)
    return (int(record["warps"]), int(record["rows_per_warp"]),
            str(record.get("dot", "mlcc_q4_dot8")))
