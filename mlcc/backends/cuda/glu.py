"""Epilogue fusion for the MLP: silu_mul runs inside the gate_up GEMM or GEMV that feeds it.

A Llama layer computes gate_up = x W^T ([rows, 2I] float16), then silu_mul reads it back and
writes h = silu(gate) * up ([rows, I]). In prefill the tensor-core GEMM (mlcc.backends.cuda.gemm)
pairs gate feature f and up feature I + f in one thread's accumulators; in decode (1 to
GEMV_MAX_ROWS static rows of a q4 gate_up) the persistent GEMV (mlcc.backends.cuda.gemv) loads
the gate and up rows of f into one warp's tile. Either way the pair becomes one call:

    q_linear(x, W) -> gu;   silu_mul(gu) -> h     =>   linear_silu_mul(x, W) -> h
    linear(x, W) -> gu;     silu_mul(gu) -> h     =>   linear_silu_mul(x, W) -> h

The [rows, 2I] intermediate is never written and one kernel launch per layer disappears. The
fused call keeps the linear's inputs and attributes and adds `glu_weights` ("q4" or "f16").
It applies when silu_mul directly follows the linear and reads its output, nothing later reads
that output, the values are float16, and either
  - the linear would run on the tensor-core GEMM (rows symbolic: the prefill length) and the
    GLU mode fits its tile (whole mma fragments per half warp tile, I even), or
  - it is a q4 linear of static rows that a decode GEMV takes (gemv_q4_applies), the tensor-core
    GEMV does not (it won those shapes' timings and has no GLU mode), and N is even.
Results equal the unfused pair bit for bit: g and u are rounded to float16 as the GEMM or GEMV
stores them, then go through silu_mul's arithmetic (SILU_MUL, the expression of its kernel).
The fused call writes silu_mul's output while it still reads the linear's input, so the two must
not share workspace bytes: the memory plan keeps the linear's inputs alive through the pair
(mlcc.passes.layout.FUSABLE_PAIRS), and fuse_adjacent declines a fused call whose output would
overlap an input anyway. (Planned as two kernels, the 7B plans put both at one offset and the
fused kernels raced: logits changed from call to call on the H200, 2026-11-29-h200-f.)

The decode GEMV's launch comes from the tuning database's persistent record for the gate_up
shape (N = 2I, K): same warps, rotation, dot and register buffering, with P = max(1,
rows_per_warp // 2) output features per tile, so a tile loads 2P weight rows (never fewer than
one gate/up pair). Where that doubles a tile's rows (rows_per_warp 1, the 7B gate_up's record),
blocks per SM shrink in proportion (3 -> 2), which keeps the weight rows in flight per SM at
most the measured kernel's (rounded up) and fits the registers: at K = 4096 nvcc 13 gives two
rows per tile 126 registers a thread against 64 for one, so only two blocks of 8 warps fit an
SM (tests/compile/test_cuda_gemv_glu_emulated.py). benchmarks/cuda/gemv_sweep.py times the
fused kernel at other launches ("glu" build set).

    fuse_glu(plan)                  the plan with every fusable pair replaced (the builder runs
                                    it when the `fuse_glu_gemm` knob is on)
    gen_linear_silu_mul(spec, name) the kernel of a linear_silu_mul spec
    glu_gemv_config(n, k)           the persistent GEMV launch of a decode gate_up of N x K
"""

from __future__ import annotations

import dataclasses

from mlcc.backends.cuda import gemm
from mlcc.backends.cuda.kernels import CudaKernel
from mlcc.backends.cuda.tuning import PersistentConfig, glu_config, persistent_config
from mlcc.backends.plan import EntryPlan, KernelCall, KernelSpec, fuse_adjacent
from mlcc.errors import MlccError

STAGE = "compile"
OP = "linear_silu_mul"
WEIGHTS_ATTR = "glu_weights"
# silu_mul's float32 arithmetic on float16-rounded g and u (the text of the silu_mul kernels of
# mlcc.backends.cuda.kernels; tests/unit/test_cuda_glu_plan.py keeps the two the same)
SILU_MUL = "({g} / (1.0f + expf(-{g}))) * {u}"


def fuse_glu(plan: EntryPlan) -> EntryPlan:
    """The plan with each (gate_up GEMM or GEMV, silu_mul) pair replaced by one linear_silu_mul
    call."""
    return fuse_adjacent(plan, _fuse)


def _fuse(first: KernelCall, second: KernelCall, later: list[KernelCall]) -> KernelCall | None:
    a, b = first.spec, second.spec
    if a.op not in ("q_linear", "linear") or b.op != "silu_mul":
        return None
    gate_up = first.buffers[len(a.inputs)]
    if second.buffers[0] != gate_up or gate_up.source != "workspace":
        return None
    if any(gate_up in c.buffers for c in later):
        return None  # another reader needs the gate_up values themselves
    if a.inputs[0][1] != "float16" or b.inputs[0][1] != "float16" or b.outputs[0][1] != "float16":
        return None
    if not (_runs_glu_gemv(a) or _runs_glu_gemm(a)):
        return None
    weights = "q4" if a.op == "q_linear" else "f16"
    attrs = tuple(sorted(a.attrs + ((WEIGHTS_ATTR, weights),)))
    spec = KernelSpec(OP, a.inputs, b.outputs, attrs)
    return KernelCall(spec, first.buffers[:len(a.inputs)] + [second.buffers[-1]])


def _runs_glu_gemv(spec: KernelSpec) -> bool:
    """True for a decode q4 linear (static rows) that the CUDA-core GEMVs would take: the
    persistent GEMV's GLU mode runs it."""
    from mlcc.backends.cuda import gemv_tc, linear

    s = linear.LinearShape(spec)
    if not linear.gemv_q4_applies(s) or s.n % 2 or s.ydt != "float16":
        return False
    return gemv_tc.gemv_q4_tc_rule(spec, "glu_probe") is None


def _runs_glu_gemm(spec: KernelSpec) -> bool:
    """True when the linear rules would hand `spec` to the tensor-core GEMM and its GLU mode
    fits the tile that GEMM would use."""
    from mlcc.backends.cuda import linear

    for rule in linear.LINEAR_RULES:
        if rule is gemm.gemm_tc_rule:
            break
        if rule(spec, "glu_probe") is not None:
            return False  # an earlier rule (a decode GEMV) owns this linear
    if gemm.gemm_tc_rule(spec, "glu_probe") is None:
        return False
    s = linear.LinearShape(spec)
    return not gemm.glu_problems(s, gemm.choose_tile(s, gemm.gemm_tc_kind(s) == "q4"))


def linear_spec(spec: KernelSpec) -> KernelSpec:
    """The gate_up linear inside a linear_silu_mul spec ([rows, 2I] float16 results)."""
    attrs = dict(spec.attrs)
    weights = attrs.pop(WEIGHTS_ATTR, None)
    if weights not in ("q4", "f16"):
        raise MlccError(STAGE, f"{OP} spec: attribute {WEIGHTS_ATTR} must be 'q4' or 'f16', got "
                        f"{weights!r}; build it with mlcc.backends.cuda.glu.fuse_glu")
    (shape, dtype) = spec.outputs[0]
    features = spec.inputs[1][0][0]  # q_weight [N, K/8] or weight [N, K]
    op = "q_linear" if weights == "q4" else "linear"
    return KernelSpec(op, spec.inputs, ((tuple(shape[:-1]) + (features,), dtype),),
                      tuple(sorted(attrs.items())))


def glu_gemv_config(n: int, k: int) -> PersistentConfig:
    """The persistent GEMV launch of the GLU mode for a gate_up weight of N x K: the GLU
    mode's own database record when there is one (tuning.glu_config), else the plain GEMV's
    record for N x K with rows_per_warp // 2 output features (pairs) per tile, at least one,
    and blocks per SM cut where a tile's weight rows grow (see the module docstring)."""
    measured = glu_config(n, k)
    if measured is not None:
        return measured
    config = persistent_config(n, k)
    pairs = max(1, config.rows_per_warp // 2)
    in_flight = config.blocks_per_sm * config.rows_per_warp  # weight rows per SM and warp slot
    blocks = min(config.blocks_per_sm, max(1, -(-in_flight // (2 * pairs))))
    return dataclasses.replace(config, blocks_per_sm=blocks, rows_per_warp=pairs)


def gen_linear_silu_mul(spec: KernelSpec, name: str) -> CudaKernel:
    """The TMA GEMV's GLU mode where mlcc.backends.cuda.gemv_tma marked the call (one row,
    behind a norm), else the persistent GEMV in GLU mode for decode rows of a q4 gate_up, else
    the tensor-core GEMM in GLU mode with the tile the unfused gate_up GEMM would use."""
    from mlcc.backends.cuda import gemv
    from mlcc.backends.cuda.linear import LinearShape, gemv_q4_applies

    s = LinearShape(linear_spec(spec))
    (out_shape, _) = spec.outputs[0]
    if 2 * out_shape[-1] != s.n:
        raise MlccError(STAGE, f"{name}: {OP} outputs {out_shape[-1]} features from a gate_up "
                        f"weight of {s.n}; expected {s.n // 2} (half the weight's rows)")
    from mlcc.backends.cuda import gemv_tma

    if gemv_tma.marked(spec):
        return gemv_tma.gemv_tma_glu_kernel(s, name, SILU_MUL)
    if gemv_q4_applies(s):
        c = glu_gemv_config(s.n, s.k)
        return gemv.gemv_q4_persistent_kernel(s, name, c.blocks_per_sm, c.warps, c.rows_per_warp,
                                              dot=c.dot, rotate=c.rotate, pingpong=c.pingpong,
                                              glu=SILU_MUL)
    kind = gemm.gemm_tc_kind(s)
    if kind is None:
        raise MlccError(STAGE, f"{name}: {OP} needs a linear the tensor-core GEMM takes "
                        f"(float16 activations, K % 32 == 0, q4f16 or float16 weights); got x "
                        f"{s.xdt}, K {s.k}; leave the fuse_glu_gemm knob off for this model")
    return gemm.gemm_tc_kernel(s, name, gemm.choose_tile(s, kind == "q4"), glu=True)
