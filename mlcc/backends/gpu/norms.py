"""Row norms for the TVM-generated GPU languages: one block per row, shared-memory reduction.

rms_norm, layer_norm and their residual-add fusions over rows of H features. The threads of a
block stride over the row, each summing its part in float32; the parts meet in a tree reduction
in shared memory (one float per thread), which needs no warp shuffles, so it is valid where the
warp size is 1 (WebGPU, OpenCL, iPhone). Every thread reads the total and writes its features.
Values are recomputed from the inputs rather than kept, so a row of any length fits.
Arithmetic follows the IR interpreter: float32 inside, the residual sum rounded to the model
dtype before normalizing, outputs rounded to the model dtype.

With `bind=False` there are no threads to reduce across: the portable serial kernel is used.
"""

from __future__ import annotations

from mlcc.backends.gpu.threads import Grid, bind_threads
from mlcc.backends.llvm.fallback import Emitter, f32, fp, header, to
from mlcc.backends.llvm.fallback import gen_norm as portable_norm
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym


def _power_of_two_at_most(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def gen_norm(spec: KernelSpec, name: str, limit: int, bind: bool = True) -> str:
    """TVMScript of the norm kernel with at most `limit` threads per block."""
    if not bind:
        return bind_threads(portable_norm(spec, name, True), Grid(limit, False))
    fused_add, layer = spec.op.startswith("add_"), spec.op.endswith("layer_norm")
    (shape, dt) = spec.inputs[0]
    h = shape[-1]
    names = ["x"] + (["r"] if fused_add else []) + ["w"] + (["b"] if layer else [])
    ins = [(n, shape if n in ("x", "r") else (h,), dt) for n in names]
    outs = [("y", shape, dt)] + ([("s", shape, dt)] if fused_add else [])
    threads = _power_of_two_at_most(min(limit, max(32, h)))
    steps = -(-h // threads)
    em = Emitter()
    header(em, name, ins + outs)
    rows = shape[0].name if isinstance(shape[0], Sym) else shape[0]
    k = f"(j * {threads} + tx)"
    value = f32("x[row, k]", dt)
    if fused_add:
        value = f32(to(dt, f"{value} + {f32('r[row, k]', dt)}"), dt)
    value = "(" + value.replace("k]", f"{k}]") + ")"  # an operand of * and - below
    em(f'for row in T.thread_binding({rows}, thread="blockIdx.x"):')
    em.depth = 2
    em(f'for tx in T.thread_binding({threads}, thread="threadIdx.x"):')
    em.depth = 3
    em(f'red = T.alloc_buffer(({threads},), "float32", scope="shared")')
    em('acc = T.alloc_buffer((2,), "float32", scope="local")')
    if layer:
        _reduce(em, threads, steps, h, value, "acc[0]")
        em(f"acc[0] = red[0] / T.float32({h})")
        em('T.tvm_storage_sync("shared")')
        _reduce(em, threads, steps, h, f"({value} - acc[0]) * ({value} - acc[0])", "acc[1]")
    else:
        _reduce(em, threads, steps, h, f"{value} * {value}", "acc[1]")
    eps = spec.attr("eps")
    em(f"acc[1] = T.float32(1) / T.sqrt(red[0] / T.float32({h}) + {fp(eps)})")
    with em.block(f"for j in range({steps}):"), em.block(f"if {k} < {h}:"):
        if fused_add:
            em(f"s[row, {k}] = {to(dt, value)}")
        if layer:
            out = (f"({value} - acc[0]) * acc[1] * {f32(f'w[{k}]', dt)} + "
                   f"{f32(f'b[{k}]', dt)}")
        else:
            out = f"{value} * acc[1] * ({f32(f'w[{k}]', dt)} + {fp(spec.attr('weight_offset'))})"
        em(f"y[row, {k}] = {to(dt, out)}")
    return em.text()


def _reduce(em: Emitter, threads: int, steps: int, h: int, term: str, slot: str) -> None:
    """Sum `term` over the row into red[0] (every thread may read it after the last sync)."""
    k = f"(j * {threads} + tx)"
    em(f"{slot} = T.float32(0)")
    with em.block(f"for j in range({steps}):"), em.block(f"if {k} < {h}:"):
        em(f"{slot} = {slot} + {term}")
    em(f"red[tx] = {slot}")
    stride = threads // 2
    while stride >= 1:
        em('T.tvm_storage_sync("shared")')
        with em.block(f"if tx < {stride}:"):
            em(f"red[tx] = red[tx] + red[tx + {stride}]")
        stride //= 2
    em('T.tvm_storage_sync("shared")')
