"""L2 prefetch of the next GEMV's weights by the light kernel before it (decode).

A decode step alternates weight-streaming GEMVs with short kernels that read a few KB: the
attention of one token, the norms. While those run, and while each GEMV ramps up, HBM sits
mostly idle. Weights depend on nothing computed in the step, so the light kernel can start
their transfer: at its start, before it waits for the kernel ahead of it, its threads issue
bulk L2 prefetches (`cp.async.bulk.prefetch.L2`, sm_90; fire and forget, no registers or
shared memory held) of the first `budget` bytes of the GEMV that follows, spread over its
blocks. The GEMV then finds its first tiles in L2.

What is prefetched is the head of what the GEMV reads first: its weight and scale rows from
0 (the persistent and block GEMVs hand out rows in increasing order), and for the gate_up of
the GLU GEMV the head of both halves (a tile loads gate rows f and up rows I + f together).

The plan change (`attach_prefetch`) gives the light call's spec an `l2_prefetch` attribute
(per prefetched tensor: its shape, dtype and byte ranges) and appends the GEMV's weight and
scale buffers to the call. The kernel is the light op's own, wrapped (`wrap_kernel`): its
launcher takes the extra buffers and its device call goes through a variadic forwarder that
prefetches first. Below sm_90 the prefetch compiles to nothing.

Status: opt-in (`--opt "O2;l2_prefetch=1"`, 16 MB a GEMV) and slower, so off at every level.
Measured on an H200 (benchmarks/results/2026-11-29-h200-e): 7B decode fell from 538 to 170
tok/s with 16 MB before every GEMV (a one-block norm issues bulk prefetches at ~260 GB/s and
cannot finish before they are issued) and to 521 tok/s with the attention kernels alone
prefetching o_proj (+60 us of attention a step against -15 us of o_proj). GEMVs that found
8-16 MB of their weights in L2 were only 2-4% faster: they are bound by instruction issue, not
by HBM. Outputs are unchanged by the knob (tests/gpu `test_l2_prefetch_changes_no_value`).
"""

from __future__ import annotations

import re

import numpy as np

from mlcc.backends.cuda import glu
from mlcc.backends.cuda.kernels import GRID_WAIT, CudaKernel
from mlcc.backends.cuda.linear import LinearShape, gemv_q4_applies
from mlcc.backends.llvm.fallback import shape_text
from mlcc.backends.plan import EntryPlan, KernelCall, KernelSpec

ATTR = "l2_prefetch"
# Kernels that read little and may carry the prefetch of the GEMV after them.
LIGHT_OPS = ("qkv_attention", "rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm",
             "silu_mul", "gelu_mul", "q_embedding", "embedding")
DEFAULT_BUDGET = 16 << 20  # bytes a light kernel prefetches of the GEMV after it
CHUNK = 32 << 10  # bytes of one bulk prefetch instruction

SOURCE = r"""
// L2 prefetch of bytes [begin, end) of `base` (mlcc.backends.cuda.prefetch): 32 KB bulk
// prefetches handed out over the grid's blocks first, then over their threads; only whole
// 16-byte units inside the range are named.
__device__ __forceinline__ void mlcc_l2_prefetch(const void* base, long long begin,
                                                 long long end) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const long long blocks = (long long)gridDim.x * gridDim.y * gridDim.z;
  const long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y +
                          (long long)gridDim.y * blockIdx.z);
  const long long threads = (long long)blockDim.x * blockDim.y * blockDim.z;
  const long long thread = threadIdx.x + (long long)blockDim.x * (threadIdx.y +
                           (long long)blockDim.y * threadIdx.z);
  const unsigned long long at = reinterpret_cast<unsigned long long>(base);
  const unsigned long long lo = (at + begin + 15ull) & ~15ull, hi = (at + end) & ~15ull;
  if (hi <= lo) return;
  const long long chunks = (long long)((hi - lo + MLCC_PREFETCH_CHUNK - 1) /
                                       MLCC_PREFETCH_CHUNK);
  for (long long c = block + blocks * thread; c < chunks; c += blocks * threads) {
    const unsigned long long from = lo + (unsigned long long)c * MLCC_PREFETCH_CHUNK;
    const unsigned long long to = from + MLCC_PREFETCH_CHUNK < hi ? from + MLCC_PREFETCH_CHUNK
                                                                  : hi;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
                 :: "l"(from), "r"((unsigned int)(to - from)) : "memory");
  }
#endif
}
// L2 prefetch of the line holding p, by the calling thread alone (the decode attention's
// later rounds of cached positions, mlcc.backends.cuda.decode_attention)
__device__ __forceinline__ void mlcc_prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}
"""


def source() -> str:
    return f"#define MLCC_PREFETCH_CHUNK {CHUNK}ull\n" + SOURCE


def _gemv_weights(call: KernelCall) -> tuple[LinearShape, bool] | None:
    """(shape, glu) of a decode q4 GEMV call, else None."""
    spec = call.spec
    if spec.op == "q_linear":
        s, is_glu = LinearShape(spec), False
    elif spec.op == glu.OP and dict(spec.attrs).get(glu.WEIGHTS_ATTR) == "q4":
        s, is_glu = LinearShape(glu.linear_spec(spec)), True
    else:
        return None
    return (s, is_glu) if gemv_q4_applies(s) else None


def _ranges(rows: int, row_bytes: int, take: int, halves: bool) -> tuple[tuple[int, int], ...]:
    """Byte ranges of the first `take` rows (of each half with `halves`)."""
    if halves:
        half = rows // 2
        return ((0, take * row_bytes), (half * row_bytes, (half + take) * row_bytes))
    return ((0, take * row_bytes),)


def prefetch_for(call: KernelCall, budget: int):
    """(buffers, attribute value) that prefetch the first `budget` bytes `call` reads."""
    found = _gemv_weights(call)
    if found is None or budget <= 0:
        return None
    s, is_glu = found
    (wshape, wdt), (sshape, sdt) = s.spec.inputs[1], s.spec.inputs[2]
    w_row, s_row = s.words * np.dtype(wdt).itemsize, s.groups * np.dtype(sdt).itemsize
    rows = s.n // 2 if is_glu else s.n
    per_row = (w_row + s_row) * (2 if is_glu else 1)
    take = min(rows, max(1, budget // per_row))
    value = ((tuple(wshape), wdt, _ranges(s.n, w_row, take, is_glu)),
             (tuple(sshape), sdt, _ranges(s.n, s_row, take, is_glu)))
    return [call.buffers[1], call.buffers[2]], value


def attach_prefetch(plan: EntryPlan, budget: int = DEFAULT_BUDGET,
                    light_ops: tuple[str, ...] = LIGHT_OPS) -> EntryPlan:
    """The plan with each light call before a decode GEMV prefetching that GEMV's weights."""
    calls = list(plan.calls)
    for i in range(len(calls) - 1):
        here = calls[i]
        if here.spec.op not in light_ops or ATTR in dict(here.spec.attrs):
            continue
        found = prefetch_for(calls[i + 1], budget)
        if found is None:
            continue
        buffers, value = found
        spec = here.spec
        calls[i] = KernelCall(KernelSpec(spec.op, spec.inputs, spec.outputs,
                                         spec.attrs + ((ATTR, value),), spec.kv),
                              here.buffers + buffers)
    return EntryPlan(plan.name, plan.args, calls, plan.workspace_bytes, plan.symbols,
                     plan.bounds)


def base_spec(spec: KernelSpec) -> KernelSpec:
    """`spec` without the prefetch attribute (what the light op's generator expects)."""
    return KernelSpec(spec.op, spec.inputs, spec.outputs,
                      tuple(a for a in spec.attrs if a[0] != ATTR), spec.kv)


_CALL = re.compile(r'T\.call_extern\("int32", "(\w+)", ')


def wrap_kernel(kernel: CudaKernel, spec: KernelSpec) -> CudaKernel:
    """`kernel` (built from base_spec(spec)) taking the prefetched buffers as extra launcher
    arguments; its last device call prefetches them before running the kernel's own code."""
    tensors = dict(spec.attrs)[ATTR]
    names = [f"pf{i}" for i in range(len(tensors))]
    launcher = kernel.launcher
    head, sep, rest = launcher.partition("):\n")
    if not sep:
        raise ValueError(f"{kernel.name}: launcher header not found")
    launcher = head + "".join(f", {n}_h: T.handle" for n in names) + sep + rest
    bindings = [m.end() for m in re.finditer(r"\n *\w+ = T\.match_buffer\([^\n]*", launcher)]
    if not bindings:
        raise ValueError(f"{kernel.name}: launcher has no buffer bindings")
    indent = " " * 4
    extra = "".join(f'\n{indent}{n} = T.match_buffer({n}_h, {shape_text(shape)}, "{dt}")'
                    for n, (shape, dt, _) in zip(names, tensors))
    launcher = launcher[:bindings[-1]] + extra + launcher[bindings[-1]:]
    calls = list(_CALL.finditer(launcher))
    if not calls:
        raise ValueError(f"{kernel.name}: launcher calls no device function")
    last = calls[-1]
    device = last.group(1)
    pointers = "".join(f"{n}.data, " for n in names)
    launcher = (launcher[:last.start()] + f'T.call_extern("int32", "{device}_pf", {pointers}'
                + launcher[last.end():])
    params = ", ".join(f"const void* {n}" for n in names)
    issues = "\n".join(f"  mlcc_l2_prefetch({n}, {lo}LL, {hi}LL);"
                       for n, (_, _, ranges) in zip(names, tensors) for lo, hi in ranges)
    # The wrapper waits for the kernel ahead itself, after the prefetches (with pdl the build
    # then adds no wait at the top of the kernel); the wrapped code may wait again, a no-op.
    wrapper = (f"template <typename... A>\n__device__ __forceinline__ int {device}_pf({params}, "
               f"A... a) {{\n{issues}\n  {GRID_WAIT}\n  return {device}(a...);\n}}\n")
    return CudaKernel(kernel.name, kernel.device_source + "\n" + wrapper, launcher,
                      kernel.self_waiting + (f"{device}_pf",))
