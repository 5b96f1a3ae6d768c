"""Portable CPU kernels for every fused op, as TVMScript text: the fallback schedule rule.

Each generator turns a `KernelSpec` into one public PrimFunc whose loops are already laid out
for the CPU: the outer loop over rows or output features is parallel and inner loops over
contiguous features are vectorized (with `fast=False` every loop is serial, the O0 baseline).
Arithmetic follows the IR interpreter: float32 accumulation, results rounded to the model dtype
where the interpreter rounds, dequantized weights rounded to the scale dtype.

Buffers are plain (`T.match_buffer` without offsets): the entry passes views of its workspace
by pointer. Symbolic dims (seq_len) are int64 variables bound from the argument shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from mlcc.backends.plan import KernelSpec
from mlcc.ir.kv import rope_inv_freq
from mlcc.ir.types import Dim, Sym

LANES = 16
# Longer loops become LANES-wide vectors inside a serial loop: TVM vectors hold fewer than 32768
# lanes, and LLVM's code generation time explodes on wide vectors (a 4096-lane gather with
# dequantization took minutes to compile).
MAX_VECTOR_LANES = 64


class Emitter:
    """Collects TVMScript lines with indentation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0
        self.subs: list[tuple[str, str]] = []  # (variable, index expression) in effect

    def __call__(self, line: str) -> Emitter:
        for var, expr in self.subs:
            line = re.sub(rf"\b{var}\b", expr, line)
        self.lines.append("    " * self.depth + line)
        return self

    def block(self, line: str) -> _Indent:
        self(line)
        return _Indent(self)

    def loops(self, lines: list[str]) -> _Indent:
        """Open the nested loops of `lines` (as from Loops.vector); closed together."""
        opened, subs = 0, 0
        for line in lines:
            if line.startswith("for "):
                self(line)
                self.depth += 1
                opened += 1
            else:  # "var = expr": substitute the expression for the variable in the body
                var, expr = (part.strip() for part in line.split("=", 1))
                self.subs.append((var, f"({expr})"))
                subs += 1
        self.depth -= 1
        return _Indent(self, opened, subs)

    def text(self) -> str:
        return "\n".join(self.lines)


class _Indent:
    def __init__(self, em: Emitter, levels: int = 1, subs: int = 0) -> None:
        self.em = em
        self.levels = levels
        self.pop = subs

    def __enter__(self):
        self.em.depth += 1

    def __exit__(self, *exc):
        self.em.depth -= self.levels
        for _ in range(self.pop):
            self.em.subs.pop()


def shape_text(shape: tuple[Dim, ...]) -> str:
    parts = [d.name if isinstance(d, Sym) else str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def header(em: Emitter, name: str, buffers: list[tuple[str, tuple[Dim, ...], str]]) -> None:
    args = ", ".join(f"{b}_h: T.handle" for b, _, _ in buffers)
    with em.block(f"@T.prim_func\ndef {name}({args}):"):
        pass
    em.depth = 1
    em(f'T.func_attr({{"global_symbol": "{name}", "tirx.noalias": True}})')
    syms = sorted({d.name for _, shape, _ in buffers for d in shape if isinstance(d, Sym)})
    for s in syms:
        em(f"{s} = T.int64()")
    for b, shape, dtype in buffers:
        em(f'{b} = T.match_buffer({b}_h, {shape_text(shape)}, "{dtype}")')


def f32(expr: str, dtype: str) -> str:
    return expr if dtype == "float32" else f'T.Cast("float32", {expr})'


def to(dtype: str, expr: str) -> str:
    return expr if dtype == "float32" else f'T.Cast("{dtype}", {expr})'


def fp(x: float) -> str:
    return f"T.float32({float(np.float32(x))!r})"


class Loops:
    def __init__(self, fast: bool) -> None:
        self.par = "T.parallel" if fast else "range"
        self.vec = "T.vectorized" if fast else "range"

    def vector(self, var: str, extent: Dim) -> list[str]:
        """Lines of a vectorized loop of `var` over `extent`: loops longer than
        MAX_VECTOR_LANES run LANES-wide vectors in a serial loop, or serially when LANES does
        not divide them. A split loop ends with a `var = ...` line that `Emitter.loops` turns
        into a textual substitution (a let-bound index inside a vectorized loop miscompiles)."""
        if isinstance(extent, Sym) or extent < MAX_VECTOR_LANES or self.vec == "range":
            size = extent.name if isinstance(extent, Sym) else extent
            return [f"for {var} in {self.vec}({size}):"]
        if extent % LANES:
            return [f"for {var} in range({extent}):"]
        return [f"for {var}_o in range({extent // LANES}):",
                f"for {var}_l in T.vectorized({LANES}):", f"{var} = {var}_o * {LANES} + {var}_l"]


# --- row-wise ops ---------------------------------------------------------------------------


def _rows(spec: KernelSpec) -> tuple[Dim, int]:
    shape = spec.inputs[0][0]
    return shape[0], shape[-1]


def gen_norm(spec: KernelSpec, name: str, fast: bool) -> str:
    """rms_norm, layer_norm, add_rms_norm, add_layer_norm on [rows, H]."""
    L = Loops(fast)
    op = spec.op
    fused_add = op.startswith("add_")
    layer = op.endswith("layer_norm")
    (shape, dt), h = spec.inputs[0], spec.inputs[0][0][-1]
    names = ["x"] + (["r"] if fused_add else []) + ["w"] + (["b"] if layer else [])
    ins = [(n, shape if n in ("x", "r") else (h,), dt) for n in names]
    outs = [("y", shape, dt)] + ([("s", shape, dt)] if fused_add else [])
    em = Emitter()
    header(em, name, ins + outs)
    eps, offset = spec.attr("eps"), (spec.attr("weight_offset") if not layer else 0.0)
    rows = shape[0].name if isinstance(shape[0], Sym) else shape[0]
    with em.block(f"for i in {L.par}({rows}):"):
        em('v = T.alloc_buffer((%d,), "float32")' % h)
        em('acc = T.alloc_buffer((2,), "float32")')
        with em.loops(L.vector("k", h)):
            src = f32("x[i, k]", dt)
            if fused_add:
                # The sum is rounded to the model dtype before normalizing, as the interpreter does.
                em(f"v[k] = {f32(to(dt, src + ' + ' + f32('r[i, k]', dt)), dt)}")
                em(f"s[i, k] = {to(dt, 'v[k]')}")
            else:
                em(f"v[k] = {src}")
        em("acc[0] = T.float32(0)")
        em("acc[1] = T.float32(0)")
        if layer:
            with em.block(f"for k in range({h}):"):
                em("acc[0] = acc[0] + v[k]")
            em(f"acc[0] = acc[0] / T.float32({h})")
            with em.block(f"for k in range({h}):"):
                em("acc[1] = acc[1] + (v[k] - acc[0]) * (v[k] - acc[0])")
            em(f"acc[1] = T.float32(1) / T.sqrt(acc[1] / T.float32({h}) + {fp(eps)})")
            with em.loops(L.vector("k", h)):
                val = f"(v[k] - acc[0]) * acc[1] * {f32('w[k]', dt)} + {f32('b[k]', dt)}"
                em(f"y[i, k] = {to(dt, val)}")
        else:
            with em.block(f"for k in range({h}):"):
                em("acc[1] = acc[1] + v[k] * v[k]")
            em(f"acc[1] = T.float32(1) / T.sqrt(acc[1] / T.float32({h}) + {fp(eps)})")
            with em.loops(L.vector("k", h)):
                val = f"v[k] * acc[1] * ({f32('w[k]', dt)} + {fp(offset)})"
                em(f"y[i, k] = {to(dt, val)}")
    return em.text()


def _flat(shape: tuple[Dim, ...]) -> tuple[str, int]:
    """Rows expression and row length of an elementwise operand viewed as 2-D."""
    if len(shape) == 1:
        return "1", shape[0]
    rows = " * ".join(d.name if isinstance(d, Sym) else str(d) for d in shape[:-1])
    return rows, shape[-1]


def _gelu_expr(a: str, approximate: str) -> str:
    if approximate == "tanh":
        c = fp(math.sqrt(2.0 / math.pi))
        return (f"T.float32(0.5) * {a} * (T.float32(1) + T.tanh({c} * ({a} + "
                f"T.float32(0.044715) * {a} * {a} * {a})))")
    return f"T.float32(0.5) * {a} * (T.float32(1) + T.erf({a} * {fp(1 / math.sqrt(2))}))"


def gen_elementwise(spec: KernelSpec, name: str, fast: bool) -> str:
    L = Loops(fast)
    op = spec.op
    (shape, dt) = spec.outputs[0]
    in_dt = spec.inputs[0][1]
    em = Emitter()
    ins = [(f"a{i}", s, d) for i, (s, d) in enumerate(spec.inputs)]
    for i, (s, _) in enumerate(spec.inputs):
        if op in ("add", "mul") and tuple(s) != tuple(shape):
            raise NotImplementedError(f"{op} with broadcasting ({s} vs {shape}) has no kernel")
    header(em, name, ins + [("y", shape, dt)])
    rank = len(shape)
    idx = ", ".join(f"i{j}" for j in range(rank))
    gate_idx = idx
    loops = []
    for j, d in enumerate(shape):
        extent = d.name if isinstance(d, Sym) else d
        if j == rank - 1 and j > 0:
            loops += L.vector(f"i{j}", d)
        else:
            loops.append(f"for i{j} in {L.par if j == 0 else 'range'}({extent}):")
    a = f32(f"a0[{idx}]", in_dt)
    if op == "add":
        val = f"{a} + {f32(f'a1[{idx}]', in_dt)}"
    elif op == "mul":
        val = f"{a} * {f32(f'a1[{idx}]', in_dt)}"
    elif op == "scale":
        val = f"{a} * {fp(spec.attr('factor'))}"
    elif op == "silu":
        val = f"{a} / (T.float32(1) + T.exp(T.float32(0) - {a}))"
    elif op == "gelu":
        val = _gelu_expr(a, spec.attr("approximate"))
    elif op in ("silu_mul", "gelu_mul"):
        half = shape[-1]
        gate_idx = ", ".join(f"i{j}" for j in range(rank - 1))
        g = f32(f"a0[{gate_idx + ', ' if gate_idx else ''}i{rank - 1}]", in_dt)
        u = f32(f"a0[{gate_idx + ', ' if gate_idx else ''}i{rank - 1} + {half}]", in_dt)
        act = (f"{g} / (T.float32(1) + T.exp(T.float32(0) - {g}))" if op == "silu_mul"
               else _gelu_expr(g, spec.attr("approximate")))
        val = f"{act} * {u}"
    elif op == "scale_in_dtype":
        factor = float(np.float32(np.asarray(spec.attr("factor")).astype(in_dt)))
        val = f"{a} * {fp(factor)}"
    elif op == "cast":
        val = f'T.Cast("float32", a0[{idx}])' if in_dt != "float32" else f"a0[{idx}]"
    else:
        raise NotImplementedError(op)
    with em.loops(loops):
        em(f"y[{idx}] = {to(dt, val)}")
    return em.text()


# --- embedding and matmuls ------------------------------------------------------------------


def _dequant(spec: KernelSpec, w: str, s: str, row: str, k: str) -> str:
    """Expression of one dequantized weight (float32), rounded through the scale dtype."""
    bits, group = spec.attr("bits"), spec.attr("group_size")
    per_word, max_int, mask = 32 // bits, (1 << (bits - 1)) - 1, (1 << bits) - 1
    k = f"({k})"
    scale_dt = spec.inputs[1][1] if spec.op == "q_embedding" else spec.inputs[2][1]
    code = (f'T.Cast("float32", T.bitwise_and(T.shift_right({w}[{row}, {k} // {per_word}], '
            f'T.Cast("uint32", ({k} % {per_word}) * {bits})), T.uint32({mask})))')
    val = f"({code} - T.float32({max_int})) * {f32(f'{s}[{row}, {k} // {group}]', scale_dt)}"
    return f32(to(scale_dt, val), scale_dt)


def gen_embedding(spec: KernelSpec, name: str, fast: bool) -> str:
    L = Loops(fast)
    em = Emitter()
    out_shape, dt = spec.outputs[0]
    if spec.op == "embedding":
        (tshape, tdt), (ishape, idt) = spec.inputs
        header(em, name, [("table", tshape, tdt), ("ids", ishape, idt), ("y", out_shape, dt)])
        h = tshape[1]
        value = "table[ids[i], k]"
    else:
        (wshape, wdt), (sshape, sdt), (ishape, idt) = spec.inputs
        header(em, name, [("qw", wshape, wdt), ("qs", sshape, sdt), ("ids", ishape, idt),
                          ("y", out_shape, dt)])
        h = spec.attr("in_features")
        value = to(dt, _dequant(spec, "qw", "qs", "ids[i]", "k"))
    rows = ishape[0].name if isinstance(ishape[0], Sym) else ishape[0]
    with em.block(f"for i in {L.par}({rows}):"):
        with em.loops(L.vector("k", h)):
            em(f"y[i, k] = {value}")
    return em.text()


def gen_linear(spec: KernelSpec, name: str, fast: bool) -> str:
    """y[i, j] = sum_k x[i, k] * W[j, k] (+ b[j]); W dequantized on the fly for q_linear."""
    L = Loops(fast)
    em = Emitter()
    (xshape, xdt) = spec.inputs[0]
    out_shape, dt = spec.outputs[0]
    quant = spec.op == "q_linear"
    if quant:
        ins = [("x", xshape, xdt), ("qw",) + spec.inputs[1], ("qs",) + spec.inputs[2]]
        bias = len(spec.inputs) == 4
        k_total, n_out = spec.attr("in_features"), spec.inputs[1][0][0]
        weight = lambda k: _dequant(spec, "qw", "qs", "j", k)  # noqa: E731
    else:
        ins = [("x", xshape, xdt), ("w",) + spec.inputs[1]]
        bias = len(spec.inputs) == 3
        n_out, k_total = spec.inputs[1][0]
        wdt = spec.inputs[1][1]
        weight = lambda k: f32(f"w[j, {k}]", wdt)  # noqa: E731
    if bias:
        ins.append(("b",) + spec.inputs[-1])
    header(em, name, ins + [("y", out_shape, dt)])
    rows = xshape[0].name if isinstance(xshape[0], Sym) else xshape[0]
    lanes = LANES if fast and k_total % LANES == 0 else 1
    with em.block(f"for j in {L.par}({n_out}):"):
        with em.block(f"for i in range({rows}):"):
            em(f'acc = T.alloc_buffer(({lanes},), "float32")')
            with em.block(f"for l in {L.vec}({lanes}):"):
                em("acc[l] = T.float32(0)")
            with em.block(f"for ko in range({k_total // lanes}):"):
                with em.block(f"for l in {L.vec}({lanes}):"):
                    k = f"ko * {lanes} + l"
                    em(f"acc[l] = acc[l] + {f32(f'x[i, {k}]', xdt)} * {weight(k)}")
            em('tot = T.alloc_buffer((1,), "float32")')
            em("tot[0] = T.float32(0)")
            with em.block(f"for l in range({lanes}):"):
                em("tot[0] = tot[0] + acc[l]")
            total = "tot[0]" + (f" + {f32('b[j]', spec.inputs[-1][1])}" if bias else "")
            em(f"y[i, j] = {to(dt, total)}")
    return em.text()


def gen_last(spec: KernelSpec, name: str, fast: bool) -> str:
    L = Loops(fast)
    em = Emitter()
    (shape, dt) = spec.inputs[0]
    out_shape, odt = spec.outputs[0]
    header(em, name, [("x", shape, dt), ("y", out_shape, odt)])
    rows = shape[0].name if isinstance(shape[0], Sym) else shape[0]
    index = "0, k" if spec.op == "last_row" else "k"
    with em.loops(L.vector("k", shape[1])):
        value = f"x[{rows} - 1, k]"
        em(f"y[{index}] = {to(odt, f32(value, dt)) if odt != dt else value}")
    return em.text()


def gen_positions(spec: KernelSpec, name: str, fast: bool) -> str:
    """Positions of the entry's tokens: seq_info[0] + i, or seq_info[i] for a batched entry
    (row i is the next token of sequence i)."""
    (shape, dt), = spec.outputs
    batched = spec.attr("batched")
    em = Emitter()
    header(em, name, [("y", shape, dt), ("seq_info", shape if batched else (2,), "int32")])
    rows = shape[0].name if isinstance(shape[0], Sym) else shape[0]
    with em.block(f"for i in range({rows}):"):
        em("y[i] = seq_info[i]" if batched else 'y[i] = seq_info[0] + T.Cast("int32", i)')
    return em.text()


def gen_moe_route(spec: KernelSpec, name: str, fast: bool) -> str:
    """Router weights: per row, the top_k logits (ties: lower expert first) by repeated
    argmax, then a softmax over them; 0 for the other experts."""
    L = Loops(fast)
    (shape, dt), = spec.inputs
    experts, k = shape[1], spec.attr("top_k")
    em = Emitter()
    header(em, name, [("x", shape, dt), ("y", shape, "float32")])
    rows = shape[0].name if isinstance(shape[0], Sym) else shape[0]
    with em.block(f"for i in {L.par}({rows}):"):
        em(f'taken = T.alloc_buffer(({experts},), "int32")')
        em(f'idx = T.alloc_buffer(({k},), "int32")')
        em(f'val = T.alloc_buffer(({k},), "float32")')
        with em.block(f"for e in range({experts}):"):
            em("taken[e] = 0")
            em("y[i, e] = T.float32(0)")
        with em.block(f"for s in range({k}):"):
            em("val[s] = T.float32(-3.4e38)")
            em("idx[s] = 0")
            with (em.block(f"for e in range({experts}):"), em.block("if taken[e] == 0:"),
                  em.block(f"if {f32('x[i, e]', dt)} > val[s]:")):
                em(f"val[s] = {f32('x[i, e]', dt)}")
                em('idx[s] = T.Cast("int32", e)')
            em("taken[idx[s]] = 1")
        em('total = T.alloc_buffer((1,), "float32")')
        em("total[0] = T.float32(0)")
        with em.block(f"for s in range({k}):"):
            em("total[0] = total[0] + T.exp(val[s] - val[0])")
        with em.block(f"for s in range({k}):"):
            em("y[i, idx[s]] = T.exp(val[s] - val[0]) / total[0]")
    return em.text()


def gen_moe_combine(spec: KernelSpec, name: str, fast: bool) -> str:
    """y = sum over experts e (in order, float32) of w[:, e] * expert_e; experts of weight 0
    are not read."""
    L = Loops(fast)
    (wshape, wdt), outs = spec.inputs[0], spec.inputs[1:]
    (shape, dt), = spec.outputs
    em = Emitter()
    header(em, name, [("w", wshape, wdt)] + [(f"o{e}", s, d) for e, (s, d) in enumerate(outs)]
           + [("y", shape, dt)])
    rows = shape[0].name if isinstance(shape[0], Sym) else shape[0]
    terms = "".join(
        f" + T.if_then_else(w[i, {e}] != T.float32(0), w[i, {e}] * {f32(f'o{e}[i, h]', d)}, "
        "T.float32(0))" for e, (_, d) in enumerate(outs))
    with em.block(f"for i in {L.par}({rows}):"), em.loops(L.vector("h", shape[1])):
        em(f"y[i, h] = {to(dt, 'T.float32(0)' + terms)}")
    return em.text()


GENERATORS: dict[str, Callable[[KernelSpec, str, bool], str]] = {
    "rms_norm": gen_norm, "layer_norm": gen_norm, "add_rms_norm": gen_norm,
    "add_layer_norm": gen_norm,
    "add": gen_elementwise, "mul": gen_elementwise, "scale": gen_elementwise,
    "silu": gen_elementwise, "gelu": gen_elementwise, "silu_mul": gen_elementwise,
    "gelu_mul": gen_elementwise, "scale_in_dtype": gen_elementwise, "cast": gen_elementwise,
    "embedding": gen_embedding, "q_embedding": gen_embedding,
    "linear": gen_linear, "q_linear": gen_linear,
    "last_row": gen_last, "last_logits": gen_last, "positions": gen_positions,
    "moe_route": gen_moe_route, "moe_combine": gen_moe_combine,
}


def inv_freq_table(spec: KernelSpec) -> np.ndarray:
    scaling = dict(spec.attr("rope_scaling")) if spec.attr("rope_scaling") else None
    return rope_inv_freq(spec.attr("rotary_dim"), spec.attr("rope_theta"), scaling)
