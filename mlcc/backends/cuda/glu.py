"""Epilogue fusion for the prefill MLP: silu_mul runs inside the gate_up GEMM that feeds it.

A Llama prefill computes gate_up = x W^T ([rows, 2I] float16), then silu_mul reads it back and
writes h = silu(gate) * up ([rows, I]). When the GEMM is the tensor-core prefill kernel
(mlcc.backends.cuda.gemm), its GLU mode pairs gate feature f and up feature I + f in one
thread's accumulators, so the pair becomes one call:

    q_linear(x, W) -> gu;   silu_mul(gu) -> h     =>   linear_silu_mul(x, W) -> h
    linear(x, W) -> gu;     silu_mul(gu) -> h     =>   linear_silu_mul(x, W) -> h

The [rows, 2I] intermediate is never written and one kernel launch per layer disappears. The
fused call keeps the linear's inputs and attributes and adds `glu_weights` ("q4" or "f16").
It applies when silu_mul directly follows the linear and reads its output, nothing later reads
that output, the linear would run on the tensor-core GEMM (rows symbolic: the prefill length)
and the GLU mode fits its tile (float16 values, whole mma fragments per half warp tile, I
even). Results equal the unfused pair bit for bit: g and u are rounded to float16 as the GEMM
stores them, then go through silu_mul's arithmetic.

    fuse_glu(plan)                  the plan with every fusable pair replaced (the builder runs
                                    it when the `fuse_glu_gemm` knob is on)
    gen_linear_silu_mul(spec, name) the kernel of a linear_silu_mul spec
"""

from __future__ import annotations

from mlcc.backends.cuda import gemm
from mlcc.backends.cuda.kernels import CudaKernel
from mlcc.backends.plan import EntryPlan, KernelCall, KernelSpec
from mlcc.errors import MlccError

STAGE = "compile"
OP = "linear_silu_mul"
WEIGHTS_ATTR = "glu_weights"


def fuse_glu(plan: EntryPlan) -> EntryPlan:
    """The plan with each (prefill GEMM, silu_mul) pair replaced by one linear_silu_mul call."""
    calls = list(plan.calls)
    out: list[KernelCall] = []
    i = 0
    while i < len(calls):
        fused = _fuse(calls[i], calls[i + 1], calls[i + 2:]) if i + 1 < len(calls) else None
        if fused is not None:
            out.append(fused)
            i += 2
            continue
        out.append(calls[i])
        i += 1
    return EntryPlan(plan.name, plan.args, out, plan.workspace_bytes, plan.symbols)


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
    if not _runs_glu_gemm(a):
        return None
    weights = "q4" if a.op == "q_linear" else "f16"
    attrs = tuple(sorted(a.attrs + ((WEIGHTS_ATTR, weights),)))
    spec = KernelSpec(OP, a.inputs, b.outputs, attrs)
    return KernelCall(spec, first.buffers[:len(a.inputs)] + [second.buffers[-1]])


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


def gen_linear_silu_mul(spec: KernelSpec, name: str) -> CudaKernel:
    """The tensor-core GEMM in GLU mode, with the tile the unfused gate_up GEMM would use."""
    from mlcc.backends.cuda.linear import LinearShape

    s = LinearShape(linear_spec(spec))
    (out_shape, _) = spec.outputs[0]
    if 2 * out_shape[-1] != s.n:
        raise MlccError(STAGE, f"{name}: {OP} outputs {out_shape[-1]} features from a gate_up "
                        f"weight of {s.n}; expected {s.n // 2} (half the weight's rows)")
    kind = gemm.gemm_tc_kind(s)
    if kind is None:
        raise MlccError(STAGE, f"{name}: {OP} needs a linear the tensor-core GEMM takes "
                        f"(float16 activations, K % 32 == 0, q4f16 or float16 weights); got x "
                        f"{s.xdt}, K {s.k}; leave the fuse_glu_gemm knob off for this model")
    return gemm.gemm_tc_kernel(s, name, gemm.choose_tile(s, kind == "q4"), glu=True)
