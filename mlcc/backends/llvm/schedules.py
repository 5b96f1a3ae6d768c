"""CPU schedules for block-structured kernels (the ones written as tensor expressions).

`schedule_blocks(func)` applies the first rule that accepts the function; each rule returns the
scheduled function or None when it does not apply, and the list ends with a fallback that always
applies. Loop nests that a generator already wrote in their final form carry
`tirx.is_scheduled` and pass through untouched.

    rows_rule         every block starts with the same row loop (norms, row-wise epilogues):
                      the whole row is computed under one parallel loop, spatial inner loops are
                      vectorized, small intermediates stay per row.
    elementwise_rule  only spatial blocks: producers are inlined, the output loops are fused,
                      parallelized and vectorized.
    fallback_rule     parallelize the outermost spatial loop of each block, vectorize nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule

from mlcc.backends.layouts import lanes_dividing
from mlcc.backends.llvm.kernel_base import VECTOR_LANES

BlockRule = Callable[[tirx.PrimFunc], tirx.PrimFunc | None]
SPATIAL = 0  # IterVar.iter_type of a data-parallel block iterator
# Fusing loops into one parallel loop is worth it only when each task does some work.
MIN_PARALLEL_WORK = 4096


def schedule_blocks(func: tirx.PrimFunc, rules: Sequence[BlockRule] | None = None
                    ) -> tirx.PrimFunc:
    """Schedule a block-structured PrimFunc with the first rule that applies."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return func
    for rule in rules or BLOCK_RULES:
        scheduled = rule(func)
        if scheduled is not None:
            return scheduled.with_attr("tirx.is_scheduled", True)
    raise AssertionError("the block rule list must end with fallback_rule")


def _blocks(sch: Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_spatial(sch: Schedule, block) -> bool:
    return all(int(iv.iter_type) == SPATIAL for iv in sch.get(block).iter_vars)


def _static(sch: Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _inline_spatial_producers(sch: Schedule) -> None:
    """Inline every spatial block that only feeds others (casts, gathers, dequantization)."""
    for block in reversed(_blocks(sch)[:-1]):
        if not _is_spatial(sch, block):
            continue
        try:
            sch.compute_inline(block)
        except tvm.s_tir.schedule.ScheduleError:
            pass  # an output or a multiply-used value stays materialized


def _vectorize_inner(sch: Schedule, block) -> None:
    """Vectorize the innermost loop of a spatial block by the widest lane count dividing it."""
    loops = sch.get_loops(block)
    if not loops or not _is_spatial(sch, block):
        return
    extent = _static(sch, loops[-1])
    if extent is None:
        return
    lanes = lanes_dividing(extent, VECTOR_LANES)
    if lanes == 1:
        return
    if extent == lanes:
        sch.vectorize(loops[-1])
    else:
        _, inner = sch.split(loops[-1], [None, lanes])
        sch.vectorize(inner)


def rows_rule(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """Row-wise kernels with reductions: one parallel task computes whole rows."""
    sch = Schedule(func)
    blocks = _blocks(sch)
    if all(_is_spatial(sch, b) for b in blocks):
        return None
    if any(int(sch.get(b).iter_vars[0].iter_type) != SPATIAL for b in blocks):
        return None  # the outer loop of some block is a reduction: no shared row loop
    first = [sch.get(sch.get_loops(b)[0]).extent if sch.get_loops(b) else None for b in blocks]
    if any(f is None or not tvm_ffi.structural_equal(f, first[-1]) for f in first):
        return None
    # Nothing is inlined: per-row values such as 1/rms must stay computed once per row. The
    # first block anchors the row loop and every later block moves under it, in order.
    row = sch.get_loops(blocks[0])[0]
    for block in blocks[1:]:
        sch.reverse_compute_at(block, row)
    sch.parallel(row)
    for block in _blocks_under(sch, row):
        _vectorize_inner(sch, block)
    return sch.mod["main"]


def _blocks_under(sch: Schedule, loop) -> list:
    return list(sch.get_child_blocks(loop))


def elementwise_rule(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """Only spatial blocks: inline producers, then parallel + vectorized output loops."""
    sch = Schedule(func)
    if not all(_is_spatial(sch, b) for b in _blocks(sch)):
        return None
    _inline_spatial_producers(sch)
    for block in _blocks(sch):
        loops = list(sch.get_loops(block))
        inner = _static(sch, loops[-1])
        lanes = lanes_dividing(inner, VECTOR_LANES) if inner else 1
        vec = None
        if lanes > 1:
            vec = loops.pop() if inner == lanes else sch.split(loops.pop(), [None, lanes])
            if isinstance(vec, (list, tuple)):
                loops.append(vec[0])
                vec = vec[1]
        if loops and _worth_parallel(sch, loops, lanes):
            sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        if vec is not None:
            sch.vectorize(vec)
    return sch.mod["main"]


def _worth_parallel(sch: Schedule, loops: list, lanes: int) -> bool:
    total = lanes
    for loop in loops:
        extent = _static(sch, loop)
        if extent is None:
            return True
        total *= extent
    return total >= MIN_PARALLEL_WORK


def fallback_rule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Parallelize each block's outermost loop when it is spatial and static or symbolic."""
    sch = Schedule(func)
    for block in _blocks(sch):
        loops = sch.get_loops(block)
        if not loops:
            continue
        bound = sch.get(block).iter_vars
        outer_is_spatial = bound and int(bound[0].iter_type) == SPATIAL
        extent = _static(sch, loops[0])
        if outer_is_spatial and (extent is None or extent > 1):
            try:
                sch.parallel(loops[0])
            except tvm.s_tir.schedule.ScheduleError:
                pass  # the outer loop feeds a reduction; leave it serial
    return sch.mod["main"]


BLOCK_RULES: tuple[BlockRule, ...] = (rows_rule, elementwise_rule, fallback_rule)
