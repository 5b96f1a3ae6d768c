"""Folded norms: the one-row add_rms_norm kernels of a decode step split between the GEMVs.

A Llama layer's decode step runs two one-row norms (residual add, then RMSNorm), each a kernel
of one block between two GEMVs: 64 of the 7B step's 228 kernel calls, each a launch, a wait
for the GEMV ahead and a round trip through memory. The earlier prologue fusion
(mlcc.backends.cuda.fusion) made every block of the next GEMV redo the whole norm, reduction
included, and lost. Here the norm's work is split so that no block repeats a reduction:

    q_linear(a, W1) -> d;  add_rms_norm(d, res, w) -> (h, s);  C(h, W2) -> z
        =>  q_linear_residual(a, W1, res) -> (s, ssq);  rms_C(s, ssq, w, W2) -> z

- the GEMV ahead (linear.py's one-shot block GEMV) adds the residual to its float16 results as
  add_rms_norm rounds them and stores the sum s; each of its P blocks stores the float32 sum of
  squares of the sums it stored, ssq[r, block];
- the GEMV after it (the one-shot block GEMV, or the persistent GEMV's GLU mode for
  gate_up + silu_mul) adds the P partial sums in every warp, in one fixed order, so every
  block has the same inverse RMS, and while staging its row for the integer dot normalizes
  each value as the norm kernel stores it (float16 of s * inv * (w + offset)).

h is never written. The partial sums take the bytes of d (A's result, no longer stored): where
rows are static the memory plan keeps d and s alive until C has run, the fused GLU included,
and A's input apart from s (mlcc.passes.layout.STATIC_PAIRS); the fold is declined where ssq
would share bytes with another buffer of the two calls, or where a fused call's output would
share bytes with one of its inputs.

Results differ from the three kernels only in the order of the sum of squares (the norm
kernel reduces over its block's threads), so a normalized value may move by one float16 ulp.

Two forms, by the GEMVs around the norm:
- Between one-shot block GEMVs (opt-in knob `fold_norms`). Measured on an H200
  (benchmarks/results/2026-11-30-h200): correct (5.4e-3 of the logits' scale from the
  unfolded library over 65 steps, the same logits run to run) but 5-8% slower in the 7B
  decode. The one-row norm is where the next GEMV's blocks are placed and load their weights
  (the norm releases that GEMV once its own wait returns), so its latency-bound work was
  hidden; folded, that work sits on every consumer block's path after its wait (the consumers
  took 3.6-5.5 us longer, the producers no longer).
- Between two TMA GEMVs (mlcc.backends.cuda.gemv_tma; knob `tma_fold`, on at O2, and
  `fold_norms`). gemv_tma.mark runs first; the producer (o_proj behind the attention, down
  behind the GLU GEMV) keeps its place and configuration, loads its block's residual values
  after its wait and writes one partial sum a block; the consumer (qkv, the GLU GEMV) is
  marked BEHIND_FOLD: its blocks start copying their weights before their wait as before,
  now released at the producer's start, so they take the SMs as the producer's blocks leave.
  Here the consumer's copies do not wait on the norm's work, and a launch, a wait and a round
  trip a norm are gone. On an H200 (benchmarks/results/2026-11-30-h200-i, pipelined A/Bs of
  the 7B decode): 1.02x with the consumers released when the producer ends, and 1.037x more
  released at its start, about 1.06x in all; run_h200.py then reads 749.9 tok/s (690.1 before
  the lean attention and the fold). The 7B logits are within 5.2e-3 of the scale, with 16/16
  greedy tokens.

    fold_norms(plan)     the plan with every foldable (GEMV, add_rms_norm, GEMV) replaced
    GENERATORS           the kernels of the two new call kinds
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcc.backends.cuda import glu
from mlcc.backends.cuda.intdot import DP2A
from mlcc.backends.cuda.kernels import CudaKernel, fp
from mlcc.backends.plan import BufferRef, EntryPlan, KernelCall, KernelSpec, workspace_range
from mlcc.errors import MlccError

STAGE = "compile"
PRODUCER = "q_linear_residual"
CONSUMERS = {"q_linear": "rms_q_linear", glu.OP: "rms_linear_silu_mul"}


@dataclass(frozen=True)
class RowNorm:
    """How a consumer stages row r of x: the RMS norm of x over K features with the inverse
    RMS from `parts` partial sums of squares (ssq[r * parts + i]) and the weight nw."""

    parts: int
    k: int
    eps: float
    offset: float

    def prelude(self, groups: int) -> str:
        """Issue the loads of the thread's first group (values and norm weights) and of the
        partials, then add the partials: every warp in the same order (lane i takes i, i + 32,
        ...; the butterfly adds pairs commutatively), so every warp and block gets the same
        inv, and the group's loads are in flight meanwhile."""
        per_lane = -(-self.parts // 32)
        return f"""      uint4 first_x[4], first_w[4];
      if (threadIdx.x < {groups}) {{
        #pragma unroll
        for (int j = 0; j < 4; ++j) {{
          first_x[j] = reinterpret_cast<const uint4*>(x + r * {self.k}LL + threadIdx.x * 32)[j];
          first_w[j] = reinterpret_cast<const uint4*>(nw + threadIdx.x * 32)[j];
        }}
      }}
      float ssq_v[{per_lane}];
      #pragma unroll
      for (int j = 0; j < {per_lane}; ++j) {{
        const int i = lane + 32 * j;
        ssq_v[j] = i < {self.parts} ? ssq[r * {self.parts}LL + i] : 0.f;
      }}
      float ssq_part = 0.f;
      #pragma unroll
      for (int j = 0; j < {per_lane}; ++j) ssq_part += ssq_v[j];
      const float inv = 1.0f / sqrtf(mlcc_warp_sum(ssq_part) / {self.k}.0f + {fp(self.eps)});
"""

    def apply(self, raw: str, weights: str) -> str:
        """Normalize the eight float16 values of uint4 `raw` in place with the eight norm
        weights of uint4 `weights`, in the arithmetic of the norm kernel (kernels.gen_norm) and
        rounded as it stores."""
        return f"""
        {{
          half* hv = reinterpret_cast<half*>(&{raw});
          const half* wh = reinterpret_cast<const half*>(&{weights});
          #pragma unroll
          for (int e = 0; e < 8; ++e)
            hv[e] = __float2half(__half2float(hv[e]) * inv
                                 * (__half2float(wh[e]) + {fp(self.offset)}));
        }}"""


def runs_block_gemv(spec: KernelSpec) -> bool:
    """Whether the linear rules give `spec` to the one-shot block GEMV (linear.gemv_q4_rule)."""
    from mlcc.backends.cuda import linear

    if spec.op != "q_linear" or not linear.gemv_q4_applies(linear.LinearShape(spec)):
        return False
    for rule in linear.LINEAR_RULES:
        if rule(spec, "fold_probe") is not None:
            return rule is linear.gemv_q4_rule
    return False


def _consumer_dot(spec: KernelSpec, block: bool) -> str | None:
    """The dot of the GEMV that would run consumer `spec` (None: not a GEMV the fold knows);
    `block`: whether the block GEMV runs it (runs_block_gemv)."""
    from mlcc.backends.cuda import linear, tuning

    if spec.op == "q_linear" and block:
        s = linear.LinearShape(spec)
        return tuning.gemv_config(s.n, s.k)[2]
    if spec.op == glu.OP and dict(spec.attrs).get(glu.WEIGHTS_ATTR) == "q4":
        s = linear.LinearShape(glu.linear_spec(spec))
        if linear.gemv_q4_applies(s):
            return glu.glu_gemv_config(s.n, s.k).dot
    return None


def producer_parts(spec: KernelSpec) -> int:
    """Blocks of the block GEMV (or of the TMA GEMV, where `spec` is marked for it) of
    q_linear `spec`: the partial sums it writes per row."""
    from mlcc.backends.cuda import gemv_tma, linear, tuning

    s = linear.LinearShape(spec)
    if gemv_tma.marked(spec):
        return gemv_tma.blocks(s, gemv_tma.config_of(spec))
    warps, rows_per_warp, _ = tuning.gemv_config(s.n, s.k)
    return -(-s.n // (warps * rows_per_warp))


def fold_norms(plan: EntryPlan, tma_only: bool = False) -> EntryPlan:
    """The plan with each (block GEMV, add_rms_norm, integer-dot GEMV) run of calls, the norm
    reading the first GEMV's result and only the second GEMV reading the normalized row,
    replaced by a q_linear_residual call and an rms_ consumer call; likewise each (TMA GEMV,
    add_rms_norm, TMA GEMV) run (gemv_tma.mark ran first). `tma_only`: the TMA runs alone."""
    calls, out, bounds = list(plan.calls), [], dict(plan.bounds)
    block: dict[KernelSpec, bool] = {}  # runs_block_gemv of each spec, for this plan
    i = 0
    while i < len(calls):
        folded = (_fold(calls[i:i + 3], calls[i + 3:], bounds, block, tma_only)
                  if i + 2 < len(calls) else None)
        if folded is None:
            out.append(calls[i])
            i += 1
            continue
        out += folded
        i += 3
    return EntryPlan(plan.name, plan.args, out, plan.workspace_bytes, plan.symbols, plan.bounds)


def _tma_pair(a: KernelSpec, c: KernelSpec) -> bool | None:
    """For a (GEMV, norm, GEMV) run: True where both GEMVs are TMA GEMVs that take the fold
    (the producer's residual values beside its slice), False where neither is a TMA GEMV (the
    block GEMV rules decide), None where only one is (not folded)."""
    from mlcc.backends.cuda import gemv_tma, linear

    if not (gemv_tma.marked(a) or gemv_tma.marked(c)):
        return False
    if not (gemv_tma.marked(a) and gemv_tma.marked(c)) or a.op != "q_linear":
        return None
    s = linear.LinearShape(a)
    return True if gemv_tma.fits(s, gemv_tma.config_of(a), residual=True) else None


def _behind_fold(spec: KernelSpec) -> KernelSpec:
    """A TMA consumer's spec marked as behind its producer, which releases it at its start
    (gemv_tma.BEHIND_FOLD)."""
    from mlcc.backends.cuda import gemv_tma

    attrs = tuple((k, gemv_tma.BEHIND_FOLD if k == gemv_tma.ATTR else v) for k, v in spec.attrs)
    return KernelSpec(spec.op, spec.inputs, spec.outputs, attrs, spec.kv)


def _fold(run: list[KernelCall], later: list[KernelCall], bounds: dict[str, int],
          block: dict[KernelSpec, bool], tma_only: bool) -> list[KernelCall] | None:
    first, norm, second = run
    a, b, c = first.spec, norm.spec, second.spec
    if b.op != "add_rms_norm":
        return None
    tma = _tma_pair(a, c)
    if tma is None or (tma_only and not tma):
        return None
    if not tma:
        for spec in (a, c):
            if spec not in block:
                block[spec] = runs_block_gemv(spec)
        if not block[a] or _consumer_dot(c, block[c]) != DP2A:
            return None
    else:
        c = _behind_fold(c)
    n_in = len(a.inputs)
    result = first.buffers[n_in]
    (rows, features), dtype = a.outputs[0]
    if dtype != "float16" or result.source != "workspace":
        return None
    if result == norm.buffers[0]:
        residual = norm.buffers[1]
    elif result == norm.buffers[1]:
        residual = norm.buffers[0]
    else:
        return None
    weight, normed, total = norm.buffers[2], norm.buffers[3], norm.buffers[4]
    if second.buffers[0] != normed or any(normed in call.buffers for call in later):
        return None
    if any(result in call.buffers for call in later):
        return None
    parts = producer_parts(a)  # TMA GEMVs take one row only (gemv_tma.fits)
    if rows * parts * 4 > rows * features * 2:
        return None  # the partial sums must fit in the bytes of the GEMV's result
    ssq = BufferRef(result.name + ".ssq", (rows, parts), "float32", "workspace", "",
                    result.offset)
    produce = KernelCall(
        KernelSpec(PRODUCER, a.inputs + (b.inputs[0],),
                   (a.outputs[0], ((rows, parts), "float32")), a.attrs),
        first.buffers[:n_in] + [residual, total, ssq])
    norm_attrs = tuple((f"norm_{k}", v) for k, v in b.attrs)
    consume = KernelCall(
        KernelSpec(CONSUMERS[c.op], (b.inputs[0], ((rows, parts), "float32"), b.inputs[2])
                   + c.inputs[1:], c.outputs, tuple(sorted(c.attrs + norm_attrs))),
        [total, ssq, weight] + second.buffers[1:])
    if not _apart(ssq, produce, consume, bounds):
        return None
    return [produce, consume]


def _apart(ssq: BufferRef, produce: KernelCall, consume: KernelCall,
           bounds: dict[str, int]) -> bool:
    """No other buffer of the two calls shares bytes with ssq, and neither call writes over
    one of its own inputs."""
    from mlcc.backends.plan import writes_over_inputs

    lo, hi = workspace_range(ssq, bounds)
    for buf in produce.buffers + consume.buffers:
        span = workspace_range(buf, bounds)
        if buf != ssq and span is not None and span[0] < hi and lo < span[1]:
            return False
    return not (writes_over_inputs(produce, bounds) or writes_over_inputs(consume, bounds))


def _norm(spec: KernelSpec) -> RowNorm:
    attrs = dict(spec.attrs)
    parts = spec.inputs[1][0][-1]
    return RowNorm(parts, spec.inputs[0][0][-1], attrs["norm_eps"],
                   attrs.get("norm_weight_offset", 0.0))


def _inner(spec: KernelSpec, op: str) -> KernelSpec:
    """The consumer's own spec: x is the normalized row, the norm's inputs and attributes gone."""
    attrs = tuple((k, v) for k, v in spec.attrs if not k.startswith("norm_"))
    return KernelSpec(op, (spec.inputs[0],) + spec.inputs[3:], spec.outputs, attrs)


def own_spec(spec: KernelSpec) -> KernelSpec:
    """A consumer's spec as the GEMV it replaces (its norm's inputs and attributes gone);
    any other spec as it is."""
    for op, consumer in CONSUMERS.items():
        if spec.op == consumer:
            return _inner(spec, op)
    return spec


def _norm_buffers(spec: KernelSpec) -> list[tuple]:
    (x_shape, x_dt), (ssq_shape, ssq_dt), (w_shape, w_dt) = spec.inputs[:3]
    return [("x", x_shape, x_dt), ("ssq", ssq_shape, ssq_dt), ("nw", w_shape, w_dt)]


def gen_q_linear_residual(spec: KernelSpec, name: str) -> CudaKernel:
    from mlcc.backends.cuda import gemv_tma, linear, tuning

    inner = KernelSpec("q_linear", spec.inputs[:-1], spec.outputs[:1], spec.attrs)
    s = linear.LinearShape(inner)
    if gemv_tma.marked(spec):
        cfg = gemv_tma.config_of(inner)
        if spec.outputs[1][0] != (1, gemv_tma.blocks(s, cfg)):
            raise MlccError(STAGE, f"{name}: the plan expects {spec.outputs[1][0]} partial "
                            f"sums from the {s.n} x {s.k} TMA GEMV, whose launch writes "
                            f"{gemv_tma.blocks(s, cfg)} for its one row")
        return gemv_tma.gemv_tma_kernel(s, name, cfg, residual=True)
    warps, rows_per_warp, dot = tuning.gemv_config(s.n, s.k)
    parts = producer_parts(inner)
    if spec.outputs[1][0][-1] != parts:
        raise MlccError(STAGE, f"{name}: the plan expects {spec.outputs[1][0][-1]} partial sums "
                        f"a row from the {s.n} x {s.k} GEMV, whose launch writes {parts}; "
                        f"rebuild the plan with the same tuning database")
    (shape, dt) = spec.outputs[0]
    buffers = s.buffers[:-1] + [("res", shape, dt), ("sum_out", shape, dt),
                                ("ssq", spec.outputs[1][0], "float32")]
    return linear.gemv_q4_kernel(s, name, warps, rows_per_warp, buffers,
                                 outputs=("sum_out", "ssq"), dot=dot,
                                 min_blocks=tuning.block_min_blocks(s.n, s.k), residual=True)


def gen_rms_q_linear(spec: KernelSpec, name: str) -> CudaKernel:
    from mlcc.backends.cuda import gemv_tma, linear, tuning

    s = linear.LinearShape(_inner(spec, "q_linear"))
    if gemv_tma.marked(spec):
        return gemv_tma.gemv_tma_kernel(s, name, gemv_tma.config_of(spec), norm=_norm(spec),
                                        buffers=_norm_buffers(spec) + s.buffers[1:])
    warps, rows_per_warp, dot = tuning.gemv_config(s.n, s.k)
    return linear.gemv_q4_kernel(s, name, warps, rows_per_warp,
                                 _norm_buffers(spec) + s.buffers[1:], dot=dot,
                                 min_blocks=tuning.block_min_blocks(s.n, s.k), norm=_norm(spec))


def gen_rms_linear_silu_mul(spec: KernelSpec, name: str) -> CudaKernel:
    from mlcc.backends.cuda import gemv, gemv_tma, linear

    s = linear.LinearShape(glu.linear_spec(_inner(spec, glu.OP)))
    if gemv_tma.marked(spec):
        return gemv_tma.gemv_tma_glu_kernel(s, name, glu.SILU_MUL, norm=_norm(spec),
                                            buffers=_norm_buffers(spec) + gemv.glu_buffers(s)[1:])
    c = glu.glu_gemv_config(s.n, s.k)
    return gemv.gemv_q4_persistent_kernel(
        s, name, c.blocks_per_sm, c.warps, c.rows_per_warp,
        buffers=_norm_buffers(spec) + gemv.glu_buffers(s)[1:], dot=c.dot, rotate=c.rotate,
        pingpong=c.pingpong, glu=glu.SILU_MUL, norm=_norm(spec))


GENERATORS = {PRODUCER: gen_q_linear_residual, "rms_q_linear": gen_rms_q_linear,
              "rms_linear_silu_mul": gen_rms_linear_silu_mul}
