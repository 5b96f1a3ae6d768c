"""Prologue fusion for the decode GEMV: a norm or silu_mul folds into the q_linear that reads it.

In a decode step most kernels are tiny (one row) and each costs a launch and a round trip
through memory. The q4 GEMV already stages its whole activation row in shared memory, so the
op that produces that row can run there instead:

    rms_norm(x, w) -> h;             q_linear(h, W) -> y     =>  norm_q_linear(x, w, W) -> y
    add_rms_norm(x, r, w) -> h, s;   q_linear(h, W) -> y     =>  norm_q_linear(x, r, w, W) -> y, s
    silu_mul(gu) -> h;               q_linear(h, W) -> y     =>  silu_mul_q_linear(gu, W) -> y

It applies when the q_linear directly follows its producer, takes the GEMV rule, and nothing
else reads h (h is then never written). Every block recomputes the norm of the row it staged
(the row is a few KB, already read); the residual sum s is written by block 0 alone.

Measured on an H200 (benchmarks/results/2026-11-28-h200/decode_bench_fused_prologues.md): the
fused kernels are correct (the GPU parity tests passed with them) but slower than the pair they
replace, because every block repeats the prologue on its critical path (silu_mul + down
projection: 26.8 us fused against 11.9 + 1.2 us apart). With programmatic dependent launch
(the GEMV's weight loads in flight before the prologue) the norm folded into the qkv GEMV still
cost 5% of decode (benchmarks/results/2026-11-29-h200-c). The builder therefore leaves this
off unless asked (`library_parts(..., prologues=True)`).
"""

from __future__ import annotations

from mlcc.backends.cuda.intdot import DP2A
from mlcc.backends.cuda.kernels import CudaKernel, fp
from mlcc.backends.cuda.linear import LinearShape, gemv_q4_applies, gemv_q4_kernel
from mlcc.backends.cuda.tuning import gemv_config
from mlcc.backends.plan import EntryPlan, KernelCall, KernelSpec, fuse_adjacent

PROLOGUES = ("rms_norm", "add_rms_norm", "silu_mul")


def fuse_prologues(plan: EntryPlan) -> EntryPlan:
    """The plan with each fusable (producer, q_linear) pair replaced by one call."""
    return fuse_adjacent(plan, _fuse)


def _fuse(first: KernelCall, second: KernelCall, later: list[KernelCall]) -> KernelCall | None:
    a, b = first.spec, second.spec
    if a.op not in PROLOGUES or b.op != "q_linear" or not gemv_q4_applies(LinearShape(b)):
        return None
    hidden = first.buffers[len(a.inputs)]  # the producer's first output
    if second.buffers[0] != hidden or any(hidden in c.buffers for c in later):
        return None
    if a.op == "silu_mul":
        if a.inputs[0][1] != "float16":
            return None
        spec = KernelSpec("silu_mul_q_linear", a.inputs + b.inputs[1:], b.outputs, b.attrs)
        buffers = [first.buffers[0]] + second.buffers[1:]
        return KernelCall(spec, buffers)
    norm_inputs = first.buffers[:len(a.inputs)]
    attrs = b.attrs + tuple((f"norm_{k}", v) for k, v in a.attrs) + (("norm_op", a.op),)
    outputs = b.outputs + a.outputs[1:]  # the residual sum of add_rms_norm stays an output
    spec = KernelSpec("norm_q_linear", a.inputs + b.inputs[1:], outputs, tuple(sorted(attrs)))
    buffers = norm_inputs + second.buffers[1:] + first.buffers[len(a.inputs) + 1:]
    return KernelCall(spec, buffers)


def _linear_part(spec: KernelSpec, first_weight: int, x_shape) -> LinearShape:
    """The q_linear inside a fused spec: activations (rows, K) plus the weights."""
    linear_attrs = tuple((k, v) for k, v in spec.attrs if not k.startswith("norm_"))
    inner = KernelSpec("q_linear", ((x_shape, "float16"),) + spec.inputs[first_weight:],
                       spec.outputs[:1], linear_attrs)
    return LinearShape(inner)


def _permuted_store(values: str) -> str:
    """Store eight halves `values[0..7]` of block `blk` into xs in nibble-pair order."""
    return (f"#pragma unroll\n        for (int j = 0; j < 4; ++j) "
            f"xs[blk * 4 + j] = __halves2half2({values}[j], {values}[j + 4]);")


def _prologue_config(lin: LinearShape) -> tuple[int, int, str]:
    """The database's block GEMV launch for the linear; the integer dot stages its own row, so
    a fused prologue takes the exact float16-pair dot in its place."""
    warps, rows_per_warp, dot = gemv_config(lin.n, lin.k)
    return warps, rows_per_warp, "mlcc_q4_dot8_lop3_pairs" if dot == DP2A else dot


def gen_norm_q_linear(spec: KernelSpec, name: str) -> CudaKernel:
    attrs = dict(spec.attrs)
    residual = attrs["norm_op"] == "add_rms_norm"
    (shape, dt) = spec.inputs[0]
    k = shape[-1]
    lin = _linear_part(spec, 3 if residual else 2, shape)
    warps, rows_per_warp, dot = _prologue_config(lin)
    threads, stage = warps * 32, -(-(k // 8) // (warps * 32))
    names = ["x"] + (["res"] if residual else []) + ["nw"]
    buffers = [(n, shape if n != "nw" else (k,), dt) for n in names]
    buffers += lin.buffers[1:] + ([("s", shape, dt)] if residual else [])
    add = ""
    if residual:
        add = f"""
        const uint4 rv = *reinterpret_cast<const uint4*>(res + r * {k}LL + blk * 8);
        const half* rh = reinterpret_cast<const half*>(&rv);
        #pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = __float2half(__half2float(a[j]) + __half2float(rh[j]));
        if (blockIdx.x == 0) *reinterpret_cast<uint4*>(s + r * {k}LL + blk * 8) = raw[i];"""
    offset = fp(attrs["norm_weight_offset"])
    staging = f"""    uint4 raw[{stage}];
    float sq = 0.f;
    #pragma unroll
    for (int i = 0; i < {stage}; ++i) {{
      const int blk = threadIdx.x + i * {threads};
      if (blk < {k // 8}) {{
        raw[i] = *reinterpret_cast<const uint4*>(x + r * {k}LL + blk * 8);
        half* a = reinterpret_cast<half*>(&raw[i]);{add}
        #pragma unroll
        for (int j = 0; j < 8; ++j) sq += __half2float(a[j]) * __half2float(a[j]);
      }}
    }}
    const float inv = 1.0f / sqrtf(mlcc_block_sum(sq, red) / {k}.0f + {fp(attrs["norm_eps"])});
    #pragma unroll
    for (int i = 0; i < {stage}; ++i) {{
      const int blk = threadIdx.x + i * {threads};
      if (blk < {k // 8}) {{
        const uint4 wv = *reinterpret_cast<const uint4*>(nw + blk * 8);
        const half* a = reinterpret_cast<const half*>(&raw[i]);
        const half* wh = reinterpret_cast<const half*>(&wv);
        half o[8];
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          o[j] = __float2half(__half2float(a[j]) * inv * (__half2float(wh[j]) + {offset}));
        {_permuted_store("o")}
      }}
    }}"""
    outputs = ("y", "s")
    return gemv_q4_kernel(lin, name, warps, rows_per_warp, buffers, staging, outputs, dot)


def gen_silu_mul_q_linear(spec: KernelSpec, name: str) -> CudaKernel:
    (shape, dt) = spec.inputs[0]
    k = shape[-1] // 2
    lin = _linear_part(spec, 1, shape[:-1] + (k,))
    warps, rows_per_warp, dot = _prologue_config(lin)
    threads, stage = warps * 32, -(-(k // 8) // (warps * 32))
    buffers = [("gu", shape, dt)] + lin.buffers[1:]
    staging = f"""    #pragma unroll
    for (int i = 0; i < {stage}; ++i) {{
      const int blk = threadIdx.x + i * {threads};
      if (blk < {k // 8}) {{
        const uint4 gv = *reinterpret_cast<const uint4*>(gu + r * {2 * k}LL + blk * 8);
        const uint4 uv = *reinterpret_cast<const uint4*>(gu + r * {2 * k}LL + {k} + blk * 8);
        const half* gh = reinterpret_cast<const half*>(&gv);
        const half* uh = reinterpret_cast<const half*>(&uv);
        half o[8];
        #pragma unroll
        for (int j = 0; j < 8; ++j) {{
          const float g = __half2float(gh[j]);
          o[j] = __float2half(g / (1.0f + expf(-g)) * __half2float(uh[j]));
        }}
        {_permuted_store("o")}
      }}
    }}"""
    return gemv_q4_kernel(lin, name, warps, rows_per_warp, buffers, staging, dot=dot)
