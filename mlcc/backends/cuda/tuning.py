"""Tuned launch parameters of the q4 decode GEMV, read from the database shipped with mlcc.

`gemv_tuning.json` (next to this file) maps "N,K" (output features, input features) to the
kernel that `benchmarks/cuda/gemv_sweep.py` measured fastest on a GPU after validating it
against a reference; it records the device, the date and every variant's time. Two kernel
kinds exist, told apart by a record's "kind":

    "block"        (or no "kind")  the one-shot GEMV of mlcc.backends.cuda.linear: `warps`,
                   `rows_per_warp`, `dot`, optionally `min_blocks` (blocks per SM the kernel's
                   launch bound asks ptxas to fit)
    "persistent"   the persistent GEMV of mlcc.backends.cuda.gemv: also `blocks_per_sm`,
                   `rotate` (per-lane rotation of the activation reads) and `pingpong`
                   (register buffers used in turn instead of moved)
    "tcp"          the persistent tensor-core GEMV of mlcc.backends.cuda.gemv_tcp:
                   `blocks_per_sm`, `warps`, `depth` (rounds of weight loads in flight)

"best" holds the winner per shape (either kind); "best_by_kind" (optional) the winner of each
kind, so the block rule keeps a measured shape when a persistent record wins; "glu" (optional)
the persistent GEMV's GLU mode (decode gate_up + silu_mul, mlcc.backends.cuda.glu) per gate_up
shape, `rows_per_warp` counting output features (gate/up pairs) per tile. Shapes not in the
database get heuristics: for the block kind eight warps per block and as many features per
warp as keep a lane's weight loads (issued together) at 16 or fewer; for the persistent kind
two blocks of eight warps per SM, one feature per warp, the mlcc_q4_dot8_lop3_pairs dot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATABASE = Path(__file__).with_name("gemv_tuning.json")
BLOCK, PERSISTENT, TCP = "block", "persistent", "tcp"


@dataclass(frozen=True)
class PersistentConfig:
    """Launch shape of the persistent GEMV: `blocks_per_sm` x SMs blocks of `warps` warps, each
    warp computing tiles of `rows_per_warp` output features."""

    blocks_per_sm: int = 2
    warps: int = 8
    rows_per_warp: int = 1
    rotate: bool = True
    # mlcc_q4_dot8's rounding in fewer instructions; mlcc_q4_dot8_lop3 (products summed four
    # at a time in float16) is faster still but drifted past the GPU parity tests' 2e-2 on the
    # tiny q4f16_1 models (benchmarks/results/2026-11-29-h200-b); the integer dot gemv.DP2A
    # (exact products) is what the database picks where it measured faster
    dot: str = "mlcc_q4_dot8_lop3_pairs"
    pingpong: bool = False


@lru_cache(maxsize=1)
def _database() -> dict:
    if not DATABASE.is_file():
        return {}
    return json.loads(DATABASE.read_text())


def kind_of(record: dict) -> str:
    return str(record.get("kind", BLOCK))


def _record(n: int, k: int, kind: str) -> dict | None:
    key = f"{n},{k}"
    db = _database()
    record = db.get("best_by_kind", {}).get(kind, {}).get(key)
    if record is not None:
        return record
    record = db.get("best", {}).get(key)
    return record if record is not None and kind_of(record) == kind else None


def heuristic(n: int, k: int) -> tuple[int, int, str]:
    iters = -(-(k // 32) // 32)
    return 8, max(1, min(4, 16 // iters)), "mlcc_q4_dot8"


def gemv_config(n: int, k: int) -> tuple[int, int, str]:
    """(warps per block, output features per warp, nibble dot function) of the block GEMV."""
    record = _record(n, k, BLOCK)
    if record is None:
        return heuristic(n, k)
    return (int(record["warps"]), int(record["rows_per_warp"]),
            str(record.get("dot", "mlcc_q4_dot8")))


def block_min_blocks(n: int, k: int) -> int:
    """Blocks per SM the block GEMV's record asks ptxas to fit (its "min_blocks"; 0: none)."""
    record = _record(n, k, BLOCK)
    return 0 if record is None else int(record.get("min_blocks", 0))


def persistent_config(n: int, k: int) -> PersistentConfig:
    """The persistent GEMV's launch shape for N x K: the database's, else the heuristic."""
    record = _record(n, k, PERSISTENT)
    return PersistentConfig() if record is None else _persistent_of(record)


def _persistent_of(record: dict) -> PersistentConfig:
    return PersistentConfig(int(record["blocks_per_sm"]), int(record["warps"]),
                            int(record["rows_per_warp"]), bool(record.get("rotate", True)),
                            str(record.get("dot", PersistentConfig.dot)),
                            bool(record.get("pingpong", False)))


def glu_config(n: int, k: int) -> PersistentConfig | None:
    """The GLU mode's measured launch for a gate_up of N x K, or None when the database has
    none (glu.glu_gemv_config then derives one from the plain GEMV's record)."""
    record = _database().get("glu", {}).get(f"{n},{k}")
    return None if record is None else _persistent_of(record)


def tcp_config(n: int, k: int) -> tuple[int, int, int] | None:
    """(blocks_per_sm, warps, depth) of the persistent tensor-core GEMV's record for N x K, or
    None when the database has none (that kernel is then not selected)."""
    record = _record(n, k, TCP)
    if record is None:
        return None
    return int(record["blocks_per_sm"]), int(record["warps"]), int(record["depth"])


def selected_kind(n: int, k: int) -> str | None:
    """The kind of the measured winner for N x K, or None when the shape was not measured."""
    record = _database().get("best", {}).get(f"{n},{k}")
    return None if record is None else kind_of(record)
