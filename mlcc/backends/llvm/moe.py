"""CPU kernels of the sparse mixture-of-experts ops (mlcc/ir/moe_ops.py), as TVMScript text.

    moe_dispatch    one serial pass over the router weights (n x experts, a few thousand
                    entries at most): slot lists per expert, each row's slots, expert offsets.
    moe_linear /    grouped GEMM: for each expert that owns slots, a parallel loop over output
    q_moe_linear    features runs its slots one after the other, so a weight row is read once
                    per expert and reused from cache for every routed row (gathered through
                    slot_rows for the first projection). With one token (decode) each expert
                    owns at most one slot and this is a GEMV over the chosen experts' weights
                    only; experts without slots are skipped before any weight is touched.
                    Quantized experts are dequantized in the inner loop (int3/int4/int8, the
                    weight rounded to the scale dtype as the interpreter does).
    moe_reduce      per row: the weighted slot results summed in float32 in ascending expert
                    order, as the dense combination adds them.

Experts are separate parameters (as convert_weight stores them), so a kernel takes one buffer
per expert and the generator writes one loop nest per expert.
"""

from __future__ import annotations

from collections.abc import Callable

from mlcc.backends.llvm.fallback import LANES, Emitter, Loops, f32, header, to
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Dim, Sym


def _extent(d: Dim) -> str:
    return d.name if isinstance(d, Sym) else str(d)


def gen_moe_dispatch(spec: KernelSpec, name: str, fast: bool) -> str:
    """Slots ordered by expert then row; a row's slots in ascending expert order."""
    (wshape, wdt), = spec.inputs
    (rows_shape, _), (off_shape, _), _ = spec.outputs
    n, experts, k = _extent(wshape[0]), wshape[1], spec.attr("top_k")
    em = Emitter()
    header(em, name, [("w", wshape, wdt), ("slot_rows", rows_shape, "int32"),
                      ("offsets", off_shape, "int32"), ("row_slots", rows_shape, "int32")])
    em('cnt = T.alloc_buffer((1,), "int32")')
    em('rank = T.alloc_buffer((1,), "int32")')
    with em.block(f"for i in range({n}):"), em.block(f"for j in range({k}):"):
        em("slot_rows[i, j] = -1")
        em("row_slots[i, j] = -1")
    em("cnt[0] = 0")
    with em.block(f"for e in range({experts}):"):
        em('offsets[e] = cnt[0]')
        with em.block(f"for i in range({n}):"), em.block("if w[i, e] != T.float32(0):"):
            em("rank[0] = 0")
            with em.block("for f in range(e):"), em.block("if w[i, f] != T.float32(0):"):
                em("rank[0] = rank[0] + 1")
            # A row with more than top_k non-zero weights (never from moe_route) keeps its first.
            with em.block(f"if rank[0] < {k}:"):
                em(f'slot_rows[cnt[0] // {k}, cnt[0] % {k}] = T.Cast("int32", i)')
                em("row_slots[i, rank[0]] = cnt[0]")
                em("cnt[0] = cnt[0] + 1")
    em(f"offsets[{experts}] = cnt[0]")
    return em.text()


def dequant_value(bits: int, group: int, scale_dt: str, w: str, s: str, row: str,
                  k: str) -> str:
    """One dequantized weight (float32 expression), rounded through the scale dtype."""
    per_word, max_int, mask = 32 // bits, (1 << (bits - 1)) - 1, (1 << bits) - 1
    code = (f'T.Cast("float32", T.bitwise_and(T.shift_right({w}[{row}, ({k}) // {per_word}], '
            f'T.Cast("uint32", (({k}) % {per_word}) * {bits})), T.uint32({mask})))')
    value = f"({code} - T.float32({max_int})) * {f32(f'{s}[{row}, ({k}) // {group}]', scale_dt)}"
    return f32(to(scale_dt, value), scale_dt)


class _Experts:
    """Buffers and the weight expression of a moe_linear / q_moe_linear spec."""

    def __init__(self, spec: KernelSpec) -> None:
        self.quant = spec.op == "q_moe_linear"
        weights = spec.inputs[3:]
        if self.quant:
            self.count = len(weights) // 2
            (wshape, _), (_, self.scale_dt) = weights[0], weights[1]
            self.n_out, self.k_in = wshape[0], spec.attr("in_features")
            self.buffers = [(f"{part}{e}",) + weights[2 * e + i] for e in range(self.count)
                            for i, part in enumerate(("qw", "qs"))]
        else:
            self.count = len(weights)
            (self.n_out, self.k_in), self.w_dt = weights[0]
            self.buffers = [(f"w{e}",) + weights[e] for e in range(self.count)]
        self.spec = spec

    def weight(self, e: int, row: str, k: str) -> str:
        if self.quant:
            bits, group = self.spec.attr("bits"), self.spec.attr("group_size")
            return dequant_value(bits, group, self.scale_dt, f"qw{e}", f"qs{e}", row, k)
        return f32(f"w{e}[{row}, {k}]", self.w_dt)


def gen_moe_linear(spec: KernelSpec, name: str, fast: bool) -> str:
    """Grouped GEMM over each expert's slots; unused slots are written as 0."""
    L = Loops(fast)
    ex = _Experts(spec)
    (xshape, xdt), (rshape, _), (oshape, _) = spec.inputs[:3]
    (yshape, ydt), = spec.outputs
    k = rshape[1]
    em = Emitter()
    header(em, name, [("x", xshape, xdt), ("slot_rows", rshape, "int32"),
                      ("offsets", oshape, "int32")] + ex.buffers + [("y", yshape, ydt)])
    total = f"{_extent(rshape[0])} * {k}"
    with (em.block(f"for p in range(offsets[{ex.count}], {total}):"),
          em.block(f"for j in range({ex.n_out}):")):
        em(f"y[p // {k}, p % {k}, j] = {to(ydt, 'T.float32(0)')}")
    lanes = LANES if fast and ex.k_in % LANES == 0 else 1
    src = (f"x[slot_rows[p // {k}, p % {k}], {{kk}}]" if spec.attr("gather")
           else f"x[p // {k}, p % {k}, {{kk}}]")
    for e in range(ex.count):
        with (em.block(f"if offsets[{e + 1}] > offsets[{e}]:"),
              em.block(f"for j in {L.par}({ex.n_out}):"),
              em.block(f"for p in range(offsets[{e}], offsets[{e + 1}]):")):
            em(f'acc = T.alloc_buffer(({lanes},), "float32")')
            with em.block(f"for l in {L.vec}({lanes}):"):
                em("acc[l] = T.float32(0)")
            with (em.block(f"for ko in range({ex.k_in // lanes}):"),
                  em.block(f"for l in {L.vec}({lanes}):")):
                kk = f"ko * {lanes} + l"
                em(f"acc[l] = acc[l] + {f32(src.format(kk=kk), xdt)} * {ex.weight(e, 'j', kk)}")
            em('tot = T.alloc_buffer((1,), "float32")')
            em("tot[0] = T.float32(0)")
            with em.block(f"for l in range({lanes}):"):
                em("tot[0] = tot[0] + acc[l]")
            em(f"y[p // {k}, p % {k}, j] = {to(ydt, 'tot[0]')}")
    return em.text()


def gen_moe_reduce(spec: KernelSpec, name: str, fast: bool) -> str:
    """y[i] = sum over row i's experts (ascending, float32) of weight * its slot's result."""
    L = Loops(fast)
    (vshape, vdt), (wshape, wdt), (sshape, _) = spec.inputs
    (yshape, ydt), = spec.outputs
    k, hidden, experts = vshape[1], vshape[2], wshape[1]
    em = Emitter()
    header(em, name, [("v", vshape, vdt), ("w", wshape, wdt), ("row_slots", sshape, "int32"),
                      ("y", yshape, ydt)])
    with em.block(f"for i in {L.par}({_extent(vshape[0])}):"):
        em(f'acc = T.alloc_buffer(({hidden},), "float32")')
        em('cnt = T.alloc_buffer((1,), "int32")')
        with em.loops(L.vector("h", hidden)):
            em("acc[h] = T.float32(0)")
        em("cnt[0] = 0")
        with (em.block(f"for e in range({experts}):"),
              em.block("if w[i, e] != T.float32(0):")):
            with em.block(f"if cnt[0] < {k}:"), em.loops(L.vector("h", hidden)):
                slot = "row_slots[i, cnt[0]]"
                value = f32(f"v[{slot} // {k}, {slot} % {k}, h]", vdt)
                em(f"acc[h] = acc[h] + w[i, e] * {value}")
            em("cnt[0] = cnt[0] + 1")
        with em.loops(L.vector("h", hidden)):
            em(f"y[i, h] = {to(ydt, 'acc[h]')}")
    return em.text()


MOE_GENERATORS: dict[str, Callable[[KernelSpec, str, bool], str]] = {
    "moe_dispatch": gen_moe_dispatch, "moe_linear": gen_moe_linear,
    "q_moe_linear": gen_moe_linear, "moe_reduce": gen_moe_reduce,
}
