"""Validate-then-benchmark sweep of the q4 decode GEMVs (the tuning database).

Build here (TVM compiler + nvcc), run on the GPU machine (TVM runtime + torch):

    python benchmarks/cuda/gemv_sweep.py build .device/sweep [lean|...|dp2a|dp2a_block|bounded]
    python benchmarks/cuda/gemv_sweep.py run .device/sweep $OUT/gemv_sweep.json
    python benchmarks/cuda/gemv_sweep.py profile .device/sweep VARIANT   # under ncu
    python benchmarks/cuda/gemv_sweep.py merge SWEEP.json mlcc/backends/cuda/gemv_tuning.json \
        [EXCLUDED_DOT ...]

`build` writes one library with a kernel per variant for the decode GEMVs of the Llama-2-7B
shape: the persistent GEMV (mlcc.backends.cuda.gemv) at a few (blocks per SM, warps, features
per warp, rotated activation reads, register buffers moved or used in turn), the one-shot GEMV
(mlcc.backends.cuda.linear) at the
database's current pick for comparison, the persistent GEMV with fusion.py's rms_norm and
silu_mul staging, and a few batch-decode row counts (with the tensor-core GEMM at 16 rows);
`tc_variants` adds the tensor-core GEMV (mlcc.backends.cuda.gemv_tc) at 1, 4 and 16 rows (and
the batch symbol at 16) for every shape, next to the block GEMV at 4 rows and the WMMA GEMM at
16. `run` checks every variant against a
float32 reference of the same packed weights (random codes and scales) and, if it agrees, times
48 back-to-back calls replayed as one CUDA graph, cycling through copies of the weights that
together hold 120 MB or more (beyond the 50 MB L2), median of 7 replays. The JSON holds every
variant, the fastest plain single-row variant per shape ("best") and per kernel kind
("best_by_kind"), and the fastest variant per row count > 1 (or "batch") and shape
("best_at_rows", which gemv_tc.gemv_q4_tc_rule reads); copy it to
mlcc/backends/cuda/gemv_tuning.json to make those the defaults. The `glu` set times the
persistent GEMV's GLU mode (the decode linear_silu_mul of glu.py) beside the plain gate_up
GEMV; its outputs are checked against silu(g) * u of the reference and never recorded as best.
The `tcp` set times the persistent tensor-core GEMV (mlcc.backends.cuda.gemv_tcp) beside the
database's current pick for each shape; its records (kind "tcp") let `merge` adopt it. The
`tcg` and `tcgp` sets do the same for the one-shot and persistent forms of the tensor-core GEMV
that scales after the mma (mlcc.backends.cuda.gemv_tcg; records of kind "tcg" / "tcgp", only
the first of which a rule reads). The `stream` set times the streamed GEMV
(mlcc.backends.cuda.gemv_stream: weights through a cp.async ring in shared memory) beside the
database's pick for every shape, and its GLU mode beside the shipped GLU GEMV (records of kind
"stream"). The `dp2a` set does the same for the persistent GEMV with the integer dot
(gemv.DP2A; records of kind "persistent" with that dot), `dp2a_block` for the one-shot GEMV
with it (records of kind "block" with that dot), `bounded` for the one-shot GEMV under a launch
bound of some blocks per SM (records with "min_blocks").
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
LOGITS = (32000, 4096)  # the output projection stores float32 logits
# (blocks per SM, warps, features per warp, rotate). nvcc 13 for sm_90 gives the kernel 64
# registers a thread at K = 4096 and one feature per warp (3 blocks of 8 warps fit an SM), 111
# at two features (4 blocks of 4 warps), 145 at K = 11008 (3 blocks of 4 warps, 1 of 8): grids
# beyond what fits run in more than one wave.
PERSISTENT_4096 = [(2, 8, 1, True), (3, 8, 1, True), (4, 4, 1, True), (6, 4, 1, True),
                   (2, 4, 2, True), (3, 8, 1, False)]
# register buffers used in turn (gemv.py, pingpong=True): 126 registers, two blocks of 8 warps
PINGPONG_4096 = [(2, 8, 1, True)]
PERSISTENT_11008 = [(1, 8, 1, True), (2, 4, 1, True), (3, 4, 1, True), (4, 4, 1, True),
                    (3, 4, 1, False)]
FUSED = [("rms_norm", 12288, 4096), ("rms_norm", 22016, 4096), ("silu_mul", 4096, 11008)]
# Validation only (odd feature counts, partial tiles and lane groups, several rows, the tiny
# stories260K width): checked against the reference like the rest, never recorded as best.
ODD = [(1001, 4096, 2, 1), (33, 11008, 3, 3), (96, 64, 1, 2)]
# Batch decode: the persistent kernel reuses each weight word for every staged row; at 16 rows
# the tensor-core GEMM (gemm_wmma_rule, what batch_decode uses today) is the comparison.
BATCH = [(4, 22016, 4096, "block"), (4, 22016, 4096, "persistent"),
         (16, 4096, 4096, "persistent"), (16, 22016, 4096, "persistent"),
         (16, 4096, 4096, "wmma"), (16, 22016, 4096, "wmma")]
# Tensor-core GEMV (warps, 16-feature tiles, steps per round): nvcc 13 for sm_90 gives them 55
# to 119 registers at the 7B shapes, no spills (tests/compile/test_cuda_gemv_tc_build.py); at 16
# rows one round of warps * unroll <= 8 steps fits the 44 KB of staged activations. ptxas caps
# some near an occupancy step and spills 8 bytes: (8, 1, 1) at a static 16 rows (64 registers;
# the batch symbol's keeps 74) and (8, 2, 1) at 4 rows of K = 11008 (80), so those are left out.
TC_FEW_ROWS = [(8, 1, 1), (8, 1, 2), (8, 2, 1), (4, 1, 2), (8, 1, 4)]
TC_FOUR_ROWS = [(8, 1, 1), (8, 1, 2), (4, 1, 2)]
TC_MANY_ROWS = [(4, 1, 1), (8, 2, 1)]
TC_BATCH = [(8, 1, 1), (4, 1, 1)]  # Sym("batch"), 16 at run time


def _persistent(n: int, k: int, cfg: tuple, rows: int = 1, prologue: str = "none",
                pingpong: bool = False) -> dict:
    bps, warps, rpw, rotate = cfg
    tag = f"p{bps}_w{warps}_r{rpw}" + ("" if rotate else "_norot") + ("_pp" if pingpong else "")
    extra = ("" if rows == 1 else f"_m{rows}") + ("" if prologue == "none" else f"_{prologue}")
    return {"n": n, "k": k, "rows": rows, "prologue": prologue, "kind": "persistent",
            "blocks_per_sm": bps, "warps": warps, "rows_per_warp": rpw, "rotate": rotate,
            "pingpong": pingpong, "dot": "mlcc_q4_dot8", "name": f"gemv_{n}_{k}_{tag}{extra}"}


def _block(n: int, k: int, rows: int = 1, cfg: tuple | None = None, blocks: int = 0) -> dict:
    """The block GEMV at the database's pick (its min_blocks included), or at cfg = (warps,
    rows per warp, dot) under a launch bound of `blocks` per SM (0: none)."""
    from mlcc.backends.cuda.tuning import block_min_blocks, gemv_config

    warps, rpw, dot = cfg or gemv_config(n, k)
    blocks = blocks if cfg is not None else block_min_blocks(n, k)
    extra = ("" if rows == 1 else f"_m{rows}") + ("" if cfg is None else "_" + dot_tag(dot))
    extra += f"_mb{blocks}" if blocks else ""
    return {"n": n, "k": k, "rows": rows, "prologue": "none", "kind": "block", "warps": warps,
            "rows_per_warp": rpw, "dot": dot, "min_blocks": blocks,
            "name": f"gemv_{n}_{k}_block_w{warps}_r{rpw}{extra}"}


# The nibble dot functions of kernels.py with fewer instructions per packed word than
# mlcc_q4_dot8 (33.6 SASS instructions a word in the 22016 x 4096 block GEMV): masked odd pairs
# (31.7) and one lop3 per pair with the four products summed in float16 (23.7).
LEAN_DOTS = ("mlcc_q4_dot8_masked", "mlcc_q4_dot8_lop3")
LEAN_BLOCK = {4096: [(4, 4), (8, 4), (4, 2), (8, 2)], 11008: [(4, 2), (8, 2), (4, 1), (8, 1)]}
LEAN_PERSISTENT = {4096: [(2, 8, 1, True), (3, 8, 1, True), (2, 4, 2, True)],
                   11008: [(2, 4, 1, True), (3, 4, 1, True)]}


# Round two: the persistent GEMV with the lop3 dot over more launch shapes
# (blocks per SM, warps, features per warp, rotate).
LEAN2_PERSISTENT = {4096: [(2, 8, 1, True), (3, 8, 1, True), (4, 8, 1, True), (4, 4, 1, True),
                           (6, 4, 1, True), (2, 4, 2, True), (3, 4, 2, True), (4, 4, 2, True),
                           (2, 8, 2, True), (3, 8, 2, True)],
                    11008: [(1, 8, 1, True), (2, 8, 1, True), (2, 4, 1, True), (3, 4, 1, True),
                            (4, 4, 1, True), (2, 4, 2, True), (3, 4, 2, True)]}


def lean2_variants() -> list[dict]:
    out = []
    for n, k in SHAPES:
        out.append(_block(n, k))
        for c in LEAN2_PERSISTENT[k]:
            v = _persistent(n, k, c)
            out.append(dict(v, dot=LEAN_DOTS[1], name=v["name"] + "_lop3"))
        if k == 4096:
            v = _persistent(n, k, (2, 8, 1, True), pingpong=True)
            out.append(dict(v, dot=LEAN_DOTS[1], name=v["name"] + "_lop3"))
    return out


# The persistent GEMV's GLU mode (gemv.py, glu=; decode linear_silu_mul): the 22016 x 4096
# gate_up with silu(g) * u stored, [rows, 11008]. (blocks per SM, warps, output features per
# tile, rotate): a tile loads twice as many weight rows as features; nvcc 13 for sm_90 gives
# one feature (two rows) 126 registers a thread with the lop3 dot, so 2 blocks of 8 warps or 4
# of 4 fit an SM; (3, 8, 1) is the plain kernel's record as it is (1.5 waves).
GLU_SHAPE = (22016, 4096)
GLU_PERSISTENT = [(2, 8, 1, True), (3, 8, 1, True), (4, 4, 1, True), (3, 4, 1, True),
                  (2, 4, 2, True), (1, 8, 2, True)]
# validation only: several rows, odd I (1001) with partial tiles, the tiny width
GLU_ODD = [(22016, 4096, 4, 1), (2002, 4096, 3, 2), (96, 64, 2, 1)]


def dot_tag(dot: str) -> str:
    """A dot function's name in variant names: "lop3_pairs", "dp2a", ..."""
    return dot[13:] or dot[8:]


def _glu(n: int, k: int, cfg: tuple, dot: str = "mlcc_q4_dot8_lop3", rows: int = 1) -> dict:
    v = _persistent(n, k, cfg, rows)
    tag = "" if dot == "mlcc_q4_dot8" else "_" + dot_tag(dot)
    return dict(v, glu=True, dot=dot, name=v["name"].replace("gemv_", "glu_", 1) + tag)


def glu_variants() -> list[dict]:
    """The GLU GEMV at a few launches (lop3 dot, and mlcc_q4_dot8 at one), beside the plain
    gate_up GEMV at the database's pick (compare: fused against plain + silu_mul's ~1.5 us)."""
    from mlcc.backends.cuda.tuning import persistent_config

    n, k = GLU_SHAPE
    c = persistent_config(n, k)
    plain = _persistent(n, k, (c.blocks_per_sm, c.warps, c.rows_per_warp, c.rotate),
                        pingpong=c.pingpong)
    out = [_block(n, k), dict(plain, dot=c.dot, name=plain["name"] + "_" + dot_tag(c.dot))]
    out += [_glu(n, k, cfg) for cfg in GLU_PERSISTENT]
    out.append(_glu(n, k, GLU_PERSISTENT[0], dot="mlcc_q4_dot8"))
    out += [_glu(n, k, (2, 8, pairs, True), rows=rows) for n, k, rows, pairs in GLU_ODD]
    return out


def out_width(v: dict) -> int:
    """Features per row of y: N, or I = N / 2 for the GLU mode."""
    return v["n"] // 2 if v.get("glu") else v["n"]


def glu_reference(gate_up: np.ndarray) -> np.ndarray:
    """silu(g) * u in float32 of a float32 gate_up reference (rows, 2I) -> (rows, I)."""
    half = gate_up.shape[-1] // 2
    g, u = gate_up[:, :half], gate_up[:, half:]
    return g / (1 + np.exp(-g)) * u


# Round three: mlcc_q4_dot8_lop3_pairs (mlcc_q4_dot8's rounding, lop3's dequantization) at the
# launch shapes rounds one and two found best, and the shipped pick, for each shape.
LEAN3_PERSISTENT = {4096: [(2, 8, 1, True), (3, 8, 1, True), (6, 4, 1, True), (3, 4, 2, True),
                           (4, 4, 1, True), (2, 4, 2, True)],
                    11008: [(1, 8, 1, True), (2, 4, 1, True), (4, 4, 1, True)]}
PAIRS = "mlcc_q4_dot8_lop3_pairs"


def lean3_variants() -> list[dict]:
    out = []
    for n, k in SHAPES:
        out.append(_block(n, k))
        out.append(_block(n, k, cfg=(4, 2 if k == 11008 else 4, PAIRS)))
        for c in LEAN3_PERSISTENT[k]:
            v = _persistent(n, k, c)
            out.append(dict(v, dot=PAIRS, name=v["name"] + "_pairs"))
    return out


def lean_variants() -> list[dict]:
    """The block and persistent GEMVs with the lean dot functions, beside the shipped pick."""
    out = []
    for n, k in SHAPES:
        out.append(_block(n, k))
        out += [_block(n, k, cfg=(w, r, dot)) for dot in LEAN_DOTS for w, r in LEAN_BLOCK[k]]
        for c in LEAN_PERSISTENT[k]:
            v = _persistent(n, k, c)
            out.append(dict(v, dot=LEAN_DOTS[1], name=v["name"] + "_lop3"))
    return out


def variants() -> list[dict]:
    from mlcc.backends.cuda.tuning import gemv_config

    out = []
    for n, k in SHAPES:
        out.append(_block(n, k))
        out += [_persistent(n, k, c) for c in (PERSISTENT_4096 if k == 4096 else PERSISTENT_11008)]
        out += [_persistent(n, k, c, pingpong=True) for c in (PINGPONG_4096 if k == 4096 else ())]
    # fusion.py's staging strides by the block kernel's warps, so the fused kernels keep them
    out += [_persistent(n, k, (3, gemv_config(n, k)[0], 1, True), prologue=p)
            for p, n, k in FUSED]
    out += [_persistent(n, k, (2, 8, rpw, True), rows) for n, k, rpw, rows in ODD]
    for rows, n, k, kind in BATCH:
        if kind == "persistent":
            out.append(_persistent(n, k, (3, 8, 1, True), rows))
        else:
            out.append(_block(n, k, rows) if kind == "block" else
                       {"n": n, "k": k, "rows": rows, "prologue": "none", "kind": "wmma",
                        "name": f"gemm_{n}_{k}_wmma_m{rows}"})
    return out


def _tc(n: int, k: int, rows: int, cfg: tuple, symbolic: bool = False) -> dict:
    warps, tiles, unroll = cfg
    extra = ("_batch" if symbolic else "") + ("" if rows == 1 else f"_m{rows}")
    return {"n": n, "k": k, "rows": rows, "prologue": "none", "kind": "tc", "warps": warps,
            "tiles": tiles, "unroll": unroll, "symbolic": symbolic,
            "name": f"gemv_{n}_{k}_tc_w{warps}_t{tiles}_u{unroll}{extra}"}


def tc_variants() -> list[dict]:
    """The tensor-core GEMV at 1, 4 and 16 rows for every shape, with the block GEMV at 4 rows
    and the WMMA GEMM at 16 rows beside it (those already in variants() are left out)."""
    out = []
    for n, k in SHAPES:
        out += [_tc(n, k, 1, c) for c in TC_FEW_ROWS]
        out += [_tc(n, k, 4, c) for c in TC_FOUR_ROWS] + [_block(n, k, 4)]
        out += [_tc(n, k, 16, c) for c in TC_MANY_ROWS]
        out += [_tc(n, k, 16, c, symbolic=True) for c in TC_BATCH]
        out.append({"n": n, "k": k, "rows": 16, "prologue": "none", "kind": "wmma",
                    "name": f"gemm_{n}_{k}_wmma_m16"})
    known = {v["name"] for v in variants()}
    return [v for v in out if v["name"] not in known]


# Persistent tensor-core GEMV (blocks per SM, warps, rounds of loads in flight), and
# validation-only shapes: partial last tiles (N % 16), one round per tile (K = 128), 3 rows.
TCP_CONFIGS = [(2, 4, 2), (3, 4, 2), (4, 4, 2), (2, 8, 2), (3, 8, 2), (2, 4, 3), (3, 4, 3),
               (4, 4, 3), (2, 8, 3)]
TCP_ODD = [(1001, 4096, 3, (3, 4, 2)), (33, 128, 1, (2, 4, 3)), (4104, 11008, 1, (2, 8, 2))]


def _tcp(n: int, k: int, cfg: tuple, rows: int = 1) -> dict:
    bps, warps, depth = cfg
    extra = "" if rows == 1 else f"_m{rows}"
    return {"n": n, "k": k, "rows": rows, "prologue": "none", "kind": "tcp",
            "blocks_per_sm": bps, "warps": warps, "depth": depth,
            "name": f"gemv_{n}_{k}_tcp_b{bps}_w{warps}_d{depth}{extra}"}


# Group-aligned tensor-core GEMV (warps, depth, fold, cols) and validation-only shapes (a
# partial last tile; 43 or 86 iterations over the warps). The row layout (cols False) was
# slower than the shipped GEMVs on every 7B shape (benchmarks/results/2026-11-29-h200-e).
TCG_CONFIGS = [(w, d, f, True) for f in (False, True) for w in (4, 8, 16) for d in (1, 2, 3)]
TCG_ODD = [(1001, 4096, (8, 2, False, True)), (1001, 4096, (8, 2, True, True)),
           (4104, 11008, (16, 1, True, True)), (1001, 4096, (8, 2, False, False))]


def _tcg(n: int, k: int, cfg: tuple) -> dict:
    warps, depth, fold, cols = cfg
    return {"n": n, "k": k, "rows": 1, "prologue": "none", "kind": "tcg", "warps": warps,
            "depth": depth, "fold": fold, "cols": cols,
            "name": f"gemv_{n}_{k}_tcg_w{warps}_d{depth}{'_fold' if fold else ''}"
                    f"{'_cols' if cols else ''}"}


# The persistent form (blocks per SM, warps, depth, fold); validation-only: partial last tile.
TCGP_CONFIGS = [(b, w, d, f) for f in (False, True) for b, w in ((2, 8), (3, 8), (4, 8), (6, 4))
                for d in (2, 3)] + [(3, 8, 4, False), (4, 8, 1, False)]
TCGP_ODD = [(1001, 4096, (3, 8, 2, False)), (1001, 4096, (3, 8, 3, True))]


def _tcgp(n: int, k: int, cfg: tuple) -> dict:
    bps, warps, depth, fold = cfg
    return {"n": n, "k": k, "rows": 1, "prologue": "none", "kind": "tcgp",
            "blocks_per_sm": bps, "warps": warps, "depth": depth, "fold": fold,
            "name": f"gemv_{n}_{k}_tcgp_b{bps}_w{warps}_d{depth}{'_fold' if fold else ''}"}


def _beside_picks(make, configs: list[tuple], odd: list[tuple]) -> list[dict]:
    """make(n, k, config) for every shape and config next to the database's pick for the
    shape, then the validation-only (n, k, config) of `odd`."""
    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
        out += [make(n, k, c) for c in configs]
    return out + [make(n, k, c) for n, k, c in odd]


def tcgp_variants() -> list[dict]:
    """The persistent form of the scale-after-mma tensor-core GEMV (TCGP_CONFIGS)."""
    return _beside_picks(_tcgp, TCGP_CONFIGS, TCGP_ODD)


def tcg_variants() -> list[dict]:
    """The one-shot form of the scale-after-mma tensor-core GEMV (TCG_CONFIGS)."""
    return _beside_picks(_tcg, TCG_CONFIGS, TCG_ODD)


def current_pick(n: int, k: int) -> dict:
    """The variant the database selects today for N x K at one row (persistent or block)."""
    from mlcc.backends.cuda.tuning import PERSISTENT, persistent_config, selected_kind

    if selected_kind(n, k) in (None, PERSISTENT):
        c = persistent_config(n, k)
        v = _persistent(n, k, (c.blocks_per_sm, c.warps, c.rows_per_warp, c.rotate),
                        pingpong=c.pingpong)
        return dict(v, dot=c.dot, name=v["name"] + "_" + dot_tag(c.dot))
    return _block(n, k)


def current_glu_pick(n: int = GLU_SHAPE[0], k: int = GLU_SHAPE[1]) -> dict:
    """The GLU GEMV at the launch the database gives a gate_up of N x K (the 7B's) today."""
    from mlcc.backends.cuda.glu import glu_gemv_config

    c = glu_gemv_config(n, k)
    return _glu(n, k, (c.blocks_per_sm, c.warps, c.rows_per_warp, c.rotate), dot=c.dot)


def tcp_variants() -> list[dict]:
    """The persistent tensor-core GEMV at TCP_CONFIGS for every shape next to the database's
    pick, then TCP_ODD (validated only: not decode shapes, so never recorded)."""
    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
        out += [_tcp(n, k, c) for c in TCP_CONFIGS]
    out += [_tcp(n, k, c, rows) for n, k, rows, c in TCP_ODD]
    return out


# The streamed GEMV (mlcc.backends.cuda.gemv_stream): (blocks per SM, warps, output features
# per chunk, ring stages per warp), at most 48 KB of shared memory a block and as many blocks
# as fit an SM's 228 KB (1 KB reserved a block); GLU configs count output features (two weight
# rows each). Validation only: partial last chunks, K = 11008's units left over past the last
# full round of lanes.
STREAM_CONFIGS = {4096: [(4, 2, 2, 4), (6, 2, 2, 3), (4, 1, 4, 4), (8, 1, 2, 4), (6, 2, 1, 6),
                         (6, 3, 1, 4), (8, 2, 1, 4)],
                  11008: [(5, 1, 1, 3), (4, 1, 1, 4), (4, 2, 1, 2), (4, 1, 2, 2)]}
STREAM_GLU = [(4, 2, 1, 4), (6, 2, 1, 3), (8, 1, 1, 4), (4, 1, 2, 4), (6, 3, 1, 2),
              (8, 2, 1, 2)]
# the same with each lane's activations in registers (x_regs; K = 4096 only)
STREAM_XR = [(22016, 4096, (8, 2, 1, 4)), (22016, 4096, (6, 2, 2, 3)), (12288, 4096, (8, 2, 1, 4)),
             (12288, 4096, (6, 2, 2, 3)), (32000, 4096, (8, 2, 1, 4)), (4096, 4096, (8, 2, 1, 4))]
STREAM_GLU_XR = [(8, 2, 1, 2), (6, 2, 1, 3), (8, 1, 1, 4), (10, 2, 1, 2)]
STREAM_ODD = [(1001, 4096, (4, 2, 2, 4), False), (4100, 11008, (5, 1, 1, 3), False),
              (2002, 4096, (4, 2, 1, 4), True)]


def _stream(n: int, k: int, cfg: tuple, glu: bool = False, x_regs: bool = False) -> dict:
    bps, warps, chunk_rows, stages = cfg
    prefix = "glu" if glu else "gemv"
    return {"n": n, "k": k, "rows": 1, "prologue": "none", "kind": "stream",
            "blocks_per_sm": bps, "warps": warps, "chunk_rows": chunk_rows,
            "stages": stages, "glu": glu, "x_regs": x_regs,
            "name": f"{prefix}_{n}_{k}_st_b{bps}_w{warps}_r{chunk_rows}_s{stages}"
                    + ("_xr" if x_regs else "")}


def stream_variants() -> list[dict]:
    """The streamed GEMV beside the database's pick for every shape, its GLU mode beside the
    shipped GLU GEMV (glu.glu_gemv_config) on the 7B gate_up, then STREAM_ODD."""
    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
        out += [_stream(n, k, c) for c in STREAM_CONFIGS[k]]
    n, k = GLU_SHAPE
    out.append(current_glu_pick())
    out += [_stream(n, k, cfg, glu=True) for cfg in STREAM_GLU]
    out += [_stream(n, k, cfg, glu=True, x_regs=True) for cfg in STREAM_GLU_XR]
    out += [_stream(n, k, cfg, x_regs=True) for n, k, cfg in STREAM_XR]
    out += [_stream(n, k, cfg, glu) for n, k, cfg, glu in STREAM_ODD]
    return out


# The integer dot (gemv.DP2A: 16-bit activations per group, exact dp2a sums) in the persistent
# GEMV and its GLU mode: (blocks per SM, warps, features per warp, rotate); validation only:
# odd N, several rows, K = 11008's groups past the last full round of lanes.
DP2A_PERSISTENT = {4096: [(2, 8, 1, True), (3, 8, 1, True), (3, 4, 2, True), (2, 4, 2, True),
                          (4, 4, 1, True), (6, 4, 1, True)],
                   11008: [(1, 8, 1, True), (2, 4, 1, True), (3, 4, 1, True), (4, 4, 1, True),
                           (2, 8, 1, True)]}
DP2A_GLU = [(2, 8, 1, True), (3, 8, 1, True), (2, 4, 1, True), (3, 4, 1, True), (4, 4, 1, True)]
DP2A_ODD = [(1001, 4096, 1, (3, 4, 2, True)), (4100, 11008, 1, (2, 4, 1, True)),
            (4096, 4096, 4, (2, 4, 2, True))]


def dp2a_variants() -> list[dict]:
    """The persistent GEMV with the integer dot beside the database's pick for every shape,
    its GLU mode beside the shipped GLU GEMV on the 7B gate_up, then DP2A_ODD."""
    from mlcc.backends.cuda.gemv import DP2A

    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
        for c in DP2A_PERSISTENT[k]:
            v = _persistent(n, k, c)
            out.append(dict(v, dot=DP2A, name=v["name"] + "_dp2a"))
    out.append(current_glu_pick())
    out += [_glu(*GLU_SHAPE, cfg, dot=DP2A) for cfg in DP2A_GLU]
    for n, k, rows, c in DP2A_ODD:
        v = _persistent(n, k, c, rows)
        out.append(dict(v, dot=DP2A, name=v["name"] + "_dp2a"))
    return out


# The one-shot GEMV (mlcc.backends.cuda.linear) with the integer dot: every block stages its
# row as 16-bit integers while its weight loads are in flight; (warps, features per warp) per
# K, validation only: odd N, four rows, K = 11008's groups past the last full round of lanes.
DP2A_BLOCK = {4096: [(4, 2), (4, 4), (8, 2), (8, 1), (2, 4)],
              11008: [(4, 2), (4, 1), (8, 1), (2, 2), (8, 2)]}
DP2A_BLOCK_ODD = [(1001, 4096, 1, (4, 2)), (4100, 11008, 1, (4, 1)), (4096, 4096, 4, (4, 2))]


def dp2a_block_variants() -> list[dict]:
    """The one-shot GEMV with the integer dot beside the database's pick for every shape."""
    from mlcc.backends.cuda.intdot import DP2A

    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
        out += [_block(n, k, cfg=(w, r, DP2A)) for w, r in DP2A_BLOCK[k]]
    out += [_block(n, k, rows, cfg=(w, r, DP2A)) for n, k, rows, (w, r) in DP2A_BLOCK_ODD]
    return out


# The one-shot GEMV with its launch bound asking for blocks per SM (ptxas then caps the
# registers: 167 -> 128 a thread for the integer dot at K = 11008, four features a warp, two
# blocks of 8 or four of 4 warps an SM: one wave of blocks); (warps, features, dot, blocks).
BOUNDED = {11008: [(4, 2, "mlcc_q4_dp2a", 4), (8, 2, "mlcc_q4_dp2a", 2),
                   (8, 2, "mlcc_q4_dp2a", 3), (4, 2, "mlcc_q4_dot8_lop3_pairs", 4),
                   (4, 2, "mlcc_q4_dot8_lop3_pairs", 6), (4, 2, "mlcc_q4_dp2a", 3)],
           4096: [(4, 4, "mlcc_q4_dp2a", 4), (4, 4, "mlcc_q4_dp2a", 5), (4, 2, "mlcc_q4_dp2a", 6),
                  (4, 2, "mlcc_q4_dot8", 6), (8, 4, "mlcc_q4_dp2a", 2)]}
BOUNDED_ODD = [(4100, 11008, 1, (4, 2, "mlcc_q4_dp2a", 4)),
               (4096, 4096, 4, (4, 4, "mlcc_q4_dp2a", 4))]


def bounded_variants() -> list[dict]:
    """The one-shot GEMV under launch bounds beside the database's pick for every shape."""
    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
        out += [_block(n, k, cfg=(w, r, dot), blocks=b) for w, r, dot, b in BOUNDED[k]]
    out += [_block(n, k, rows, cfg=(w, r, dot), blocks=b)
            for n, k, rows, (w, r, dot, b) in BOUNDED_ODD]
    return out


# Experiment: the persistent GEMV with a tile's rows spread over the matrix (row q of tile t is
# t + q * tiles instead of t * rows_per_warp + q), as the GLU mode's gate and up rows are;
# (n, k, (blocks per SM, warps, features per warp, rotate), dot).
SPREAD = [(n, k, c, d) for n, k in SHAPES for c in ((3, 4, 2, True), (2, 4, 2, True))
          for d in ("mlcc_q4_dp2a", "mlcc_q4_dot8_lop3_pairs")]
SPREAD += [(n, k, (2, 4, 4, True), "mlcc_q4_dp2a") for n, k in SHAPES if k == 4096]


def spread_variants() -> list[dict]:
    out = []
    for n, k in SHAPES:
        out.append(current_pick(n, k))
    for n, k, c, d in SPREAD:
        v = _persistent(n, k, c)
        out.append(dict(v, dot=d, spread=True, name=v["name"] + "_" + dot_tag(d) + "_spread"))
    return out


def spread_rows(kernel, rows_per_warp: int, n: int):
    """The kernel's source with tile t's row q at t + q * tiles (see SPREAD)."""
    import dataclasses
    import re

    tiles = -(-n // rows_per_warp)
    src = re.sub(rf"\(long long\)\(([^()]*)\) \* {rows_per_warp} \+ q",
                 lambda m: f"(long long)({m.group(1)}) + q * {tiles}LL", kernel.device_source)
    src = src.replace(f"(long long)tile * {rows_per_warp} + q", f"(long long)tile + q * {tiles}LL")
    assert src.count(f"q * {tiles}LL") >= 2, "spread: the row expressions were not found"
    return dataclasses.replace(kernel, device_source=src)


def linear_spec(n: int, k: int, rows: int):
    from mlcc.backends.plan import KernelSpec

    ydt = "float32" if (n, k) == LOGITS else "float16"
    return KernelSpec("q_linear", (((rows, k), "float16"), ((n, k // 8), "uint32"),
                                   ((n, k // 32), "float16")), (((rows, n), ydt),),
                      (("bits", 4), ("group_size", 32), ("in_features", k)))


def fused_spec(v: dict):
    """The spec fusion.fuse_prologues makes for (rms_norm | silu_mul) -> q_linear."""
    from mlcc.backends.plan import KernelSpec

    lin = linear_spec(v["n"], v["k"], v["rows"])
    rows, k = v["rows"], v["k"]
    if v["prologue"] == "silu_mul":
        return KernelSpec("silu_mul_q_linear", (((rows, 2 * k), "float16"),) + lin.inputs[1:],
                          lin.outputs, lin.attrs)
    attrs = lin.attrs + (("norm_eps", 1e-5), ("norm_op", "rms_norm"),
                         ("norm_weight_offset", 0.0))
    return KernelSpec("norm_q_linear", (((rows, k), "float16"), ((k,), "float16"))
                      + lin.inputs[1:], lin.outputs, tuple(sorted(attrs)))


def kernel_of(v: dict):
    """The CudaKernel of one variant."""
    from unittest import mock

    from mlcc.backends.cuda import fusion
    from mlcc.backends.cuda.gemv import fusion_gemv, gemv_q4_persistent_kernel
    from mlcc.backends.cuda.linear import LinearShape, gemm_wmma_rule, gemv_q4_kernel
    from mlcc.backends.cuda.tuning import PersistentConfig

    if v["prologue"] != "none":
        # fusion.py builds its kernels with linear.gemv_q4_kernel; the persistent kernel takes
        # the same arguments (fusion_gemv), so its staging strings are used unchanged.
        config = PersistentConfig(v["blocks_per_sm"], v["warps"], v["rows_per_warp"],
                                  v["rotate"], pingpong=v["pingpong"])
        generate = (fusion.gen_silu_mul_q_linear if v["prologue"] == "silu_mul"
                    else fusion.gen_norm_q_linear)
        with mock.patch.object(fusion, "gemv_q4_kernel", fusion_gemv(config)):
            return generate(fused_spec(v), v["name"])
    if v["kind"] == "tma_glu":
        from mlcc.backends.cuda.gemv_tma import gemv_tma_glu_kernel
        from mlcc.backends.cuda.glu import SILU_MUL

        return gemv_tma_glu_kernel(LinearShape(linear_spec(v["n"], v["k"], 1)), v["name"],
                                   SILU_MUL, v["depth"], v.get("timing_only", False))
    if v["kind"] == "stream":
        from mlcc.backends.cuda.gemv_stream import StreamConfig, gemv_q4_stream_kernel
        from mlcc.backends.cuda.glu import SILU_MUL

        config = StreamConfig(v["blocks_per_sm"], v["warps"], v["chunk_rows"], v["stages"],
                              x_regs=v.get("x_regs", False))
        return gemv_q4_stream_kernel(LinearShape(linear_spec(v["n"], v["k"], 1)), v["name"],
                                     config, glu=SILU_MUL if v["glu"] else None)
    if v["kind"] == "tma":
        from mlcc.backends.cuda.gemv_tma import TmaConfig, gemv_tma_kernel

        return gemv_tma_kernel(LinearShape(linear_spec(v["n"], v["k"], 1)), v["name"],
                               TmaConfig(v["ks"], v["teams"], v["chunk"], v["early"],
                                         v.get("timing_only", False), v.get("depth", 0)))
    if v["kind"] == "tcp":
        from mlcc.backends.cuda.gemv_tcp import TcpConfig, gemv_q4_tcp_kernel

        return gemv_q4_tcp_kernel(LinearShape(linear_spec(v["n"], v["k"], v["rows"])), v["name"],
                                  TcpConfig(v["blocks_per_sm"], v["warps"], v["depth"]))
    if v["kind"] == "tcgp":
        from mlcc.backends.cuda.gemv_tcg import TcgpConfig, gemv_q4_tcgp_kernel

        return gemv_q4_tcgp_kernel(LinearShape(linear_spec(v["n"], v["k"], 1)), v["name"],
                                   TcgpConfig(v["blocks_per_sm"], v["warps"], v["depth"],
                                              v["fold"]))
    if v["kind"] == "tcg":
        from mlcc.backends.cuda.gemv_tcg import TcgConfig, gemv_q4_tcg_kernel

        return gemv_q4_tcg_kernel(LinearShape(linear_spec(v["n"], v["k"], 1)), v["name"],
                                  TcgConfig(v["warps"], v["depth"], v["fold"],
                                            v.get("cols", False)))
    if v["kind"] == "tc":
        from mlcc.backends.cuda.gemv_tc import TcConfig, gemv_q4_tc_kernel
        from mlcc.ir.types import Sym

        rows = Sym("batch") if v["symbolic"] else v["rows"]
        return gemv_q4_tc_kernel(LinearShape(linear_spec(v["n"], v["k"], rows)), v["name"],
                                 TcConfig(v["warps"], v["tiles"], v["unroll"]))
    spec = linear_spec(v["n"], v["k"], v["rows"])
    s = LinearShape(spec)
    if v["kind"] == "wmma":
        return gemm_wmma_rule(spec, v["name"])
    if v["kind"] == "block":
        return gemv_q4_kernel(s, v["name"], v["warps"], v["rows_per_warp"], dot=v["dot"],
                              min_blocks=v.get("min_blocks", 0),
                              row_first=v.get("row_first", False))
    if v.get("glu"):
        from mlcc.backends.cuda.glu import SILU_MUL

        return gemv_q4_persistent_kernel(s, v["name"], v["blocks_per_sm"], v["warps"],
                                         v["rows_per_warp"], dot=v["dot"], rotate=v["rotate"],
                                         pingpong=v["pingpong"], glu=SILU_MUL)
    kernel = gemv_q4_persistent_kernel(s, v["name"], v["blocks_per_sm"], v["warps"],
                                       v["rows_per_warp"], dot=v["dot"], rotate=v["rotate"],
                                       pingpong=v["pingpong"])
    return spread_rows(kernel, v["rows_per_warp"], v["n"]) if v.get("spread") else kernel


def _tma(n: int, k: int, cfg: tuple) -> dict:
    ks, teams, chunk, early, depth = (*cfg, 0)[:5]
    tag = (f"tma_{n}x{k}_s{ks}_t{teams}_c{chunk}" + ("" if early is None else f"_e{early}")
           + (f"_d{depth}" if depth else ""))
    return {"n": n, "k": k, "rows": 1, "prologue": "none", "kind": "tma", "ks": ks,
            "teams": teams, "chunk": chunk, "early": early, "depth": depth, "name": tag}


def tma_variants() -> list[dict]:
    """The TMA GEMV (mlcc.backends.cuda.gemv_tma) beside the database's pick for the three
    7B decode shapes whose slice fits a block's shared memory."""
    from mlcc.backends.cuda.gemv_tma import TmaConfig, fits
    from mlcc.backends.cuda.linear import LinearShape

    configs = {4096: [(1, 8, 16, None), (1, 8, 8, None), (1, 4, 8, None), (2, 4, 8, None),
                      (1, 16, 16, None), (1, 8, 16, 2)],
               11008: [(4, 2, 8, None), (4, 4, 8, None), (8, 1, 8, None), (8, 2, 8, None),
                       (4, 2, 4, None), (4, 2, 8, 2)]}
    out = []
    for n, k in ((4096, 4096), (12288, 4096), (4096, 11008)):
        out.append(current_pick(n, k))
        for cfg in configs[k]:
            if fits(LinearShape(linear_spec(n, k, 1)), TmaConfig(*cfg)):
                out.append(_tma(n, k, cfg))
    return out


def tma_depth_variants() -> list[dict]:
    """The TMA GEMV with a producer warp keeping at most `depth` chunks a block in flight
    (TmaConfig.depth) beside the database's pick, for the three 7B shapes it takes."""
    from mlcc.backends.cuda.gemv_tma import TmaConfig, fits
    from mlcc.backends.cuda.linear import LinearShape

    out = []
    for n, k in ((4096, 4096), (12288, 4096), (4096, 11008)):
        out.append(current_pick(n, k))
        # (K slices, teams, features a chunk: a multiple of teams) with 8 warps, then depths
        splits = ((1, 8, 8), (2, 4, 4), (4, 2, 2)) if k == 4096 else ((4, 2, 8), (4, 2, 4),
                                                                       (4, 2, 2))
        for ks, teams, chunk in splits:
            for depth in {8: (2, 3, 4), 4: (3, 4, 6), 2: (6, 8)}[chunk]:
                cfg = (ks, teams, chunk, None, depth)
                if fits(LinearShape(linear_spec(n, k, 1)), TmaConfig(*cfg[:4], False, depth)):
                    out.append(_tma(n, k, cfg))
    return out


def tma_shape_variants() -> list[dict]:
    """The default TMA GEMV (gemv_tma.default_config) at the one-row shapes other presets give
    it, beside the database's pick: qkv and o_proj of Mistral-7B (GQA), of Llama-2-7B on 2
    shards, of Llama-2-13B and of phi-2 (K = 2560: scale rows of 160 bytes)."""
    from mlcc.backends.cuda.gemv_tma import default_config, fits
    from mlcc.backends.cuda.linear import LinearShape

    out = []
    for n, k in ((6144, 4096), (4096, 2048), (15360, 5120), (5120, 5120), (7680, 2560),
                 (2560, 2560)):
        s = LinearShape(linear_spec(n, k, 1))
        if not fits(s):
            continue
        cfg = default_config(s)
        out += [current_pick(n, k), _tma(n, k, (cfg.ks, cfg.teams, cfg.chunk, None, cfg.depth))]
    return out


def _tma_glu(n: int, k: int, depth: int) -> dict:
    return {"n": n, "k": k, "rows": 1, "prologue": "none", "kind": "tma_glu", "glu": True,
            "depth": depth, "name": f"tma_glu_{n}x{k}_d{depth}"}


def tma_glu_variants() -> list[dict]:
    """The TMA GEMV's GLU mode (gemv_tma.gemv_tma_glu_kernel) on the 7B gate_up at 2 to 5
    chunks in flight beside the shipped GLU GEMV, and its copies alone (a timing probe)."""
    n, k = GLU_SHAPE
    out = [current_glu_pick()] + [_tma_glu(n, k, depth) for depth in (2, 3, 4, 5)]
    out.append(dict(out[2], name=out[2]["name"] + "_stream", timing_only=True))
    return out


def tma_glu_shape_variants() -> list[dict]:
    """The GLU mode at its default depth on the gate_up shapes other presets give it (Mistral-7B
    and Llama-3.1-8B: 28672 x 4096; Qwen2-1.5B: 17920 x 1536) beside their GLU GEMV."""
    from mlcc.backends.cuda.gemv_tma import GLU_DEPTH

    out = []
    for n, k in ((28672, 4096), (17920, 1536)):
        out += [current_glu_pick(n, k), _tma_glu(n, k, GLU_DEPTH)]
    return out


def tma_warps_variants() -> list[dict]:
    """Consumer warps of the TMA GEMV beside the database's pick: the 7B qkv and o_proj at 8
    (default_config) and 16 warps; the 7B down at gemv_tma.stream_config (16 warps) and at 20
    and 24 warps, whose last chunk is not full (32 rows in chunks of 10 or 12: the rows past
    the block's must store nothing); and stream_config at Qwen2-1.5B's down (12 rows: one full
    chunk and one of 4). The 2-shard 7B down (K = 5504) keeps its GEMV: its scale rows of 344
    bytes are no whole 16-byte units."""
    from mlcc.backends.cuda.gemv_tma import default_config, fits, stream_config
    from mlcc.backends.cuda.linear import LinearShape

    def cfg_of(c) -> tuple:
        return c.ks, c.teams, c.chunk, None, c.depth

    out = []
    for n, k in ((12288, 4096), (4096, 4096)):
        s = LinearShape(linear_spec(n, k, 1))
        out += [current_pick(n, k), _tma(n, k, cfg_of(default_config(s))),
                _tma(n, k, cfg_of(stream_config(s)))]
    out += [current_pick(4096, 11008)] + [_tma(4096, 11008, cfg) for cfg in
                                          ((4, 4, 8, None, 2), (4, 5, 10, None, 2),
                                           (4, 6, 12, None, 2))]
    s = LinearShape(linear_spec(1536, 8960, 1))
    assert fits(s, stream_config(s)) and not fits(LinearShape(linear_spec(4096, 5504, 1)))
    return out + [current_pick(1536, 8960), _tma(1536, 8960, cfg_of(stream_config(s)))]


def tma_stream_variants() -> list[dict]:
    """Timing probes (wrong results, timed anyway): the TMA GEMV's bulk copies alone, all
    chunks issued at once, at 16 and 4 features a chunk, for the three shapes it takes."""
    out = []
    for n, k in ((4096, 4096), (12288, 4096), (4096, 11008)):
        ks = 1 if k == 4096 else 4
        for chunk in (16, 4):
            v = _tma(n, k, (ks, 8 // ks, chunk, None))
            out.append(dict(v, name=v["name"] + "_stream", timing_only=True))
    return out


def row_first_variants() -> list[dict]:
    """The one-shot GEMV with the integer dot loading its activation row ahead of its weights
    (linear.gemv_q4_kernel's row_first) beside the database's pick, for the 7B decode shapes;
    and at a few other launches for the two whose kernel ahead does not release them early."""
    out = []
    for n, k in ((4096, 4096), (4096, 11008), (12288, 4096)):
        pick = current_pick(n, k)
        out.append(pick)
        if pick["kind"] != "block":
            continue
        configs = [(pick["warps"], pick["rows_per_warp"], pick.get("min_blocks", 0))]
        if (n, k) == (4096, 4096):
            configs += [(4, 2, 4), (8, 2, 2), (4, 4, 0)]
        if (n, k) == (4096, 11008):
            configs += [(8, 1, 2), (4, 2, 4), (8, 2, 0), (16, 1, 1)]
        for warps, rpw, blocks in configs:
            v = _block(n, k, 1, (warps, rpw, pick["dot"]), blocks)
            out.append(v)
            out.append(dict(v, name=v["name"] + "_rf", row_first=True))
    return out


def build(folder: Path, only: str = "all") -> None:
    from mlcc.backends.cuda.codegen import compile_library

    chosen = {"lean": lean_variants, "lean2": lean2_variants, "lean3": lean3_variants,
              "glu": glu_variants, "tcp": tcp_variants, "tcg": tcg_variants,
              "tcgp": tcgp_variants, "stream": stream_variants,
              "dp2a": dp2a_variants, "spread": spread_variants,
              "dp2a_block": dp2a_block_variants, "bounded": bounded_variants,
              "tma": tma_variants, "tma_depth": tma_depth_variants,
              "tma_shapes": tma_shape_variants, "tma_glu": tma_glu_variants,
              "tma_glu_shapes": tma_glu_shape_variants,
              "row_first": row_first_variants,
              "tma_stream": tma_stream_variants, "tma_warps": tma_warps_variants}.get(
        only, lambda: variants() + tc_variants())()
    # a candidate may be the database's pick already (same name, same kernel): built once
    chosen = list({v["name"]: v for v in chosen}.values())
    kernels = [kernel_of(v) for v in chosen]
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    compile_library(kernels, "", "", folder / "gemv_sweep.so")
    (folder / "variants.json").write_text(json.dumps(chosen, indent=1))
    print(f"built {len(kernels)} variants in {time.perf_counter() - start:.1f} s")


def reference(qw: np.ndarray, qs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float32 x (rows, K) times the dequantized weights: (rows, N)."""
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((qw[:, :, None] >> shifts) & 15).reshape(qw.shape[0], -1).astype(np.float32)
    w = (codes - 7.0) * np.repeat(qs.astype(np.float32), 32, axis=1)
    return np.atleast_2d(x.astype(np.float32)) @ w.T


def prologue_inputs(v: dict, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """The fused kernel's leading inputs and the float16 activations its staging computes."""
    rows, k = v["rows"], v["k"]
    if v["prologue"] == "rms_norm":
        x = rng.standard_normal((rows, k)).astype(np.float16)
        w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
        xf = x.astype(np.float32)
        inv = 1 / np.sqrt((xf * xf).mean(axis=1, keepdims=True) + 1e-5)
        return [x, w], (xf * inv * w.astype(np.float32)).astype(np.float16)
    if v["prologue"] == "silu_mul":
        gu = rng.standard_normal((rows, 2 * k)).astype(np.float16)
        g, u = gu[:, :k].astype(np.float32), gu[:, k:].astype(np.float32)
        return [gu], (g / (1 + np.exp(-g)) * u).astype(np.float16)
    x = rng.standard_normal((rows, k)).astype(np.float16)
    return [x], x


def weight_copies(n: int, k: int, rng: np.random.Generator, dev) -> list[tuple]:
    import tvm

    copies = []
    nbytes = n * k // 2 + n * k // 16
    for _ in range(min(64, max(4, -(-120_000_000 // nbytes)))):  # together beyond the L2
        qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
        copies.append((qw, qs, tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev)))
    return copies


def measure(torch, lib, v: dict, copies: list[tuple], dev, rng) -> dict:
    """Validate one variant against the float32 reference; time it if it agrees."""
    import tvm

    n, k = v["n"], v["k"]
    leading, activations = prologue_inputs(v, rng)
    lead_dev = [tvm.runtime.tensor(a, dev) for a in leading]
    ydt = "float32" if (n, k) == LOGITS else "float16"
    y_dev = tvm.runtime.empty((v["rows"], out_width(v)), ydt, dev)
    f = lib[v["name"]]
    # the batch symbol's kernels read the row count from x's and y's shapes
    f(*lead_dev, copies[0][2], copies[0][3], y_dev)
    expected = reference(copies[0][0], copies[0][1], activations)
    if v.get("glu"):
        expected = glu_reference(expected)
    err = float(np.abs(y_dev.numpy().astype(np.float32) - expected).max() /
                np.abs(expected).max())
    row = dict(v, rel_err=err)
    if err < 1e-2 or v.get("timing_only"):
        row["us"] = time_variant(torch, f, lead_dev, copies, y_dev)
        row["gb_s"] = (n * k // 2 + n * k // 16) / (row["us"] * 1e-6) / 1e9
    return row


RECORD_KEYS = ("kind", "blocks_per_sm", "warps", "rows_per_warp", "min_blocks", "rotate",
               "pingpong", "dot", "tiles", "unroll", "depth", "fold", "cols", "chunk_rows",
               "stages", "x_regs", "us", "gb_s")


def run(folder: Path, out: Path) -> None:
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "gemv_sweep.so"))
    chosen = json.loads((folder / "variants.json").read_text())
    rng = np.random.default_rng(0)
    results, best, by_kind = [], {}, {"block": {}, "persistent": {}, "tc": {}, "tcp": {},
                                                  "tcg": {}, "tcgp": {}, "stream": {}}
    at_rows: dict[str, dict] = {}
    for n, k in sorted({(v["n"], v["k"]) for v in chosen}):
        copies = weight_copies(n, k, rng, dev)
        for v in [v for v in chosen if (v["n"], v["k"]) == (n, k)]:
            row = measure(torch, lib, v, copies, dev, rng)
            results.append(row)
            print(f"{v['name']:44s} err {row['rel_err']:.1e} " +
                  (f"{row['us']:7.2f} us {row['gb_s']:6.0f} GB/s" if "us" in row else "FAILED"))
            if ("us" not in row or v["prologue"] != "none" or (n, k) not in SHAPES
                    or v.get("glu") or v["kind"] == "tma"):
                continue
            record = {key: row[key] for key in RECORD_KEYS if key in row}
            key = f"{n},{k}"
            if v["rows"] != 1:
                # the batch symbol's kernels under "batch" (their rows come at run time)
                table = at_rows.setdefault("batch" if v.get("symbolic") else str(v["rows"]), {})
                if key not in table or row["us"] < table[key]["us"]:
                    table[key] = record
                continue
            for table in (best, by_kind[v["kind"]]):
                if key not in table or row["us"] < table[key]["us"]:
                    table[key] = record
        del copies
    doc = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
           "command": "python " + " ".join(sys.argv), "best": best, "best_by_kind": by_kind,
           "best_at_rows": at_rows, "variants": results}
    out.write_text(json.dumps(doc, indent=1))


def time_variant(torch, f, leading: list, copies: list[tuple], y_dev, calls: int = 48,
                 repeats: int = 7) -> float:
    """Median time per call of `calls` back-to-back calls replayed as one CUDA graph (no
    launch gaps from Python), cycling through the weight copies."""
    return replay_us(torch, lambda i: f(*leading, copies[i % len(copies)][2],
                                        copies[i % len(copies)][3], y_dev),
                     calls, warm=len(copies), repeats=repeats)

def profile(folder: Path, name: str, calls: int = 12) -> None:
    """Call one variant `calls` times over its weight copies, for a profiler such as
    `ncu -k regex:NAME --launch-skip 4 --launch-count 1 python3 gemv_sweep.py profile ...`."""
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "gemv_sweep.so"))
    v = next(v for v in json.loads((folder / "variants.json").read_text()) if v["name"] == name)
    rng = np.random.default_rng(0)
    copies = weight_copies(v["n"], v["k"], rng, dev)
    leading, _ = prologue_inputs(v, rng)
    lead_dev = [tvm.runtime.tensor(a, dev) for a in leading]
    ydt = "float32" if (v["n"], v["k"]) == LOGITS else "float16"
    y_dev = tvm.runtime.empty((v["rows"], out_width(v)), ydt, dev)
    for i in range(calls):
        copy = copies[i % len(copies)]
        lib[name](*lead_dev, copy[2], copy[3], y_dev)
    torch.cuda.synchronize()


def merge(sweep: Path, database: Path, exclude_dots: tuple[str, ...] = ()) -> None:
    """Fold the single-row winners of a sweep into the tuning database: for every shape the
    sweep timed, its fastest validated variant ("best") and each timed kind's fastest replace
    the database's (every sweep re-times the database's pick beside the candidates, so
    winners are compared within one run, never against a figure of another day); variants
    whose dot is in `exclude_dots` are not candidates, nor are the TMA GEMV's (its calls are
    chosen by their place in the step, gemv_tma.mark, not by the database). The persistent
    GLU-mode variants go to their own table ("glu", read by tuning.glu_config), fastest per
    gate_up shape. The rows
    tables ("best_at_rows"), kinds the sweep did not time and unmeasured shapes are kept. Each
    record notes its sweep."""
    doc = json.loads(sweep.read_text())
    db = json.loads(database.read_text())
    source = {"date": doc["date"], "command": doc["command"], "device": doc["device"]}
    best: dict[str, dict] = {}
    by_kind: dict[str, dict[str, dict]] = {}
    glu: dict[str, dict] = {}
    for row in doc["variants"]:
        if ("us" not in row or row["rows"] != 1 or row["prologue"] != "none"
                or (row["n"], row["k"]) not in SHAPES or row.get("dot") in exclude_dots
                or row["kind"].startswith("tma")):
            continue
        record = dict({key: row[key] for key in RECORD_KEYS if key in row}, source=source)
        key = f"{row['n']},{row['k']}"
        if row.get("glu"):  # the GLU mode's own table (tuning.glu_config), persistent only
            if row["kind"] == "persistent" and (key not in glu or row["us"] < glu[key]["us"]):
                glu[key] = record
            continue
        for table in (best, by_kind.setdefault(row["kind"], {})):
            if key not in table or row["us"] < table[key]["us"]:
                table[key] = record
    db["best"].update(best)
    db.setdefault("glu", {}).update(glu)
    for kind, table in by_kind.items():
        db.setdefault("best_by_kind", {}).setdefault(kind, {}).update(table)
    db["date"], db["command"] = doc["date"], doc["command"]
    database.write_text(json.dumps(db, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "all")
    elif sys.argv[1] == "merge":  # merge SWEEP.json DATABASE.json [excluded dot ...]
        merge(Path(sys.argv[2]), Path(sys.argv[3]), tuple(sys.argv[4:]))
    elif sys.argv[1] == "profile":
        profile(Path(sys.argv[2]), sys.argv[3])
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
