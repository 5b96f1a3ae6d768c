"""Builders that make model code read like the math.

    mb = ModuleBuilder("llama", {"model_type": "llama"})
    w = mb.add_param("model.norm.weight", (64,), "float32", kind="norm")
    with mb.function("prefill") as b:
        tokens = b.input("tokens", (Sym("seq_len"),), "int32")
        h = b.rms_norm(b.embedding(table, tokens), w, eps=1e-5)
        b.output(b.last_logits(b.linear(h, head)))
    module = mb.finish()

Every op call checks its type rule at once, so a mistake is reported where it is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlcc.ir.core import Function, Module, Node, Param, Value, param_value
from mlcc.ir.registry import TypeRuleError, get_op
from mlcc.ir.types import Dim, KVCacheType, TensorType

_STACK: list[FunctionBuilder] = []


def current_builder() -> FunctionBuilder:
    if not _STACK:
        raise RuntimeError("no active FunctionBuilder: use `with mb.function(name) as b:`")
    return _STACK[-1]


class ModuleBuilder:
    """Collects parameters and functions, then freezes them into a Module."""

    def __init__(self, name: str, attrs: dict[str, Any] | None = None) -> None:
        self.name = name
        self.attrs = dict(attrs or {})
        self.params: dict[str, Param] = {}
        self.functions: list[Function] = []

    def add_param(self, name: str, shape: Sequence[Dim], dtype: str, **annotations: Any) -> Value:
        if name in self.params:
            raise ValueError(f"parameter {name!r} is declared twice")
        param = Param(name, TensorType(dtype, tuple(shape)), annotations)
        self.params[name] = param
        return param_value(param)

    def function(self, name: str, **attrs: Any) -> FunctionBuilder:
        return FunctionBuilder(self, name, attrs)

    def finish(self) -> Module:
        return Module(self.name, tuple(self.functions), tuple(self.params.values()), self.attrs)


class FunctionBuilder:
    """Appends nodes to one function; use as a context manager and call `output` once."""

    def __init__(self, module: ModuleBuilder, name: str, attrs: dict[str, Any] | None = None):
        self.module = module
        self.name = name
        self.attrs = dict(attrs or {})
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: tuple[Value, ...] | None = None
        self._counter = 0
        self._names: set[str] = set()
        # In a batched entry (batch decode) row i of every tensor is sequence i's next token.
        self.batched = bool(self.attrs.get("batched_kv", False))

    def __enter__(self) -> FunctionBuilder:
        _STACK.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _STACK.pop()
        if exc_type is None:
            if self.outputs is None:
                raise RuntimeError(f"function {self.name!r} has no outputs: call b.output(...)")
            self.module.functions.append(
                Function(self.name, tuple(self.inputs), tuple(self.nodes), self.outputs,
                         self.attrs))

    # --- values -------------------------------------------------------------------------

    def _fresh(self, hint: str | None) -> str:
        name = hint
        # A generated name may already be taken by an explicit one ("y.0", "3"): skip it.
        while not name or name in self._names:
            name = f"{hint}.{self._counter}" if hint else str(self._counter)
            self._counter += 1
        self._names.add(name)
        return name

    def input(self, name: str, shape: Sequence[Dim], dtype: str) -> Value:
        value = Value(self._fresh(name), TensorType(dtype, tuple(shape)), "input")
        self.inputs.append(value)
        return value

    def kv_cache(self, cache_type: KVCacheType, name: str = "kv_cache") -> Value:
        value = Value(self._fresh(name), cache_type, "input")
        self.inputs.append(value)
        return value

    def output(self, *values: Value) -> None:
        self.outputs = tuple(values)

    def emit(self, op: str, *inputs: Value, name: str | None = None, **attrs: Any) -> Value:
        """Append `op(inputs, attrs)` and return its single output."""
        outputs = self.emit_multi(op, *inputs, name=name, **attrs)
        if len(outputs) != 1:
            raise TypeRuleError(f"{op} has {len(outputs)} outputs; use emit_multi")
        return outputs[0]

    def emit_multi(self, op: str, *inputs: Value, name: str | None = None,
                   **attrs: Any) -> tuple[Value, ...]:
        opdef = get_op(op)
        lo, hi = opdef.num_inputs
        if len(inputs) < lo or (hi is not None and len(inputs) > hi):
            raise TypeRuleError(f"{op} takes {lo}..{hi if hi is not None else 'n'} inputs, "
                                f"got {len(inputs)}")
        for value in inputs:
            if not isinstance(value, Value):
                raise TypeRuleError(f"{op}: inputs must be IR values, got {value!r}")
        full = opdef.complete_attrs(attrs)
        types = [v.type for v in inputs]
        try:
            out_types = opdef.infer(types, full)
            if opdef.verify is not None:
                opdef.verify(types, full)
        except TypeRuleError as err:
            args = ", ".join(f"{v.ref}: {v.type}" for v in inputs)
            raise TypeRuleError(f"{op}({args}): {err}") from None
        outs = tuple(Value(self._fresh(name), t) for t in out_types)
        self.nodes.append(Node(op, inputs, outs, full))
        return outs

    # --- ops, in the order a decoder layer uses them ------------------------------------

    def embedding(self, table: Value, ids: Value, name: str | None = None) -> Value:
        return self.emit("embedding", table, ids, name=name)

    def linear(self, x: Value, weight: Value, bias: Value | None = None,
               name: str | None = None, out_dtype: str | None = None) -> Value:
        args = (x, weight) if bias is None else (x, weight, bias)
        return self.emit("linear", *args, out_dtype=out_dtype, name=name)

    def matmul(self, a: Value, b: Value, name: str | None = None) -> Value:
        return self.emit("matmul", a, b, name=name)

    def add(self, a: Value, b: Value, name: str | None = None) -> Value:
        return self.emit("add", a, b, name=name)

    def mul(self, a: Value, b: Value, name: str | None = None) -> Value:
        return self.emit("mul", a, b, name=name)

    def scale(self, x: Value, factor: float, name: str | None = None) -> Value:
        return self.emit("scale", x, factor=float(factor), name=name)

    def silu(self, x: Value, name: str | None = None) -> Value:
        return self.emit("silu", x, name=name)

    def gelu(self, x: Value, approximate: str = "none", name: str | None = None) -> Value:
        return self.emit("gelu", x, approximate=approximate, name=name)

    def silu_mul(self, gate_up: Value, name: str | None = None) -> Value:
        return self.emit("silu_mul", gate_up, name=name)

    def rms_norm(self, x: Value, weight: Value, eps: float, weight_offset: float = 0.0,
                 name: str | None = None) -> Value:
        return self.emit("rms_norm", x, weight, eps=float(eps),
                         weight_offset=float(weight_offset), name=name)

    def layer_norm(self, x: Value, weight: Value, bias: Value, eps: float,
                   name: str | None = None) -> Value:
        return self.emit("layer_norm", x, weight, bias, eps=float(eps), name=name)

    def positions(self, cache: Value, length: Dim, name: str | None = "pos") -> Value:
        return self.emit("positions", cache, length=length, batched=self.batched, name=name)

    def rope(self, x: Value, positions: Value, theta: float, rotary_dim: int,
             style: str = "rotate_half", scaling: dict | None = None,
             name: str | None = None) -> Value:
        frozen = tuple(sorted(scaling.items())) if scaling else None
        return self.emit("rope", x, positions, theta=float(theta), rotary_dim=rotary_dim,
                         style=style, scaling=frozen, name=name)

    def attention(self, q: Value, k: Value, v: Value, cache: Value, layer: int,
                  scale: float | None = None, name: str | None = None) -> Value:
        return self.emit("attention", q, k, v, cache, layer=layer,
                         scale=None if scale is None else float(scale), batched=self.batched,
                         name=name)

    def reshape(self, x: Value, shape: Sequence[Dim], name: str | None = None) -> Value:
        return self.emit("reshape", x, shape=tuple(shape), name=name)

    def split(self, x: Value, sizes: Sequence[int], axis: int = -1,
              name: str | None = None) -> tuple[Value, ...]:
        return self.emit_multi("split", x, sizes=tuple(sizes), axis=axis, name=name)

    def concat(self, xs: Sequence[Value], axis: int = -1, name: str | None = None) -> Value:
        return self.emit("concat", *xs, axis=axis, name=name)

    def transpose(self, x: Value, perm: Sequence[int], name: str | None = None) -> Value:
        return self.emit("transpose", x, perm=tuple(perm), name=name)

    def softmax(self, x: Value, axis: int = -1, name: str | None = None) -> Value:
        return self.emit("softmax", x, axis=axis, name=name)

    def cast(self, x: Value, dtype: str, name: str | None = None) -> Value:
        return self.emit("cast", x, dtype=dtype, name=name)

    def last_logits(self, x: Value, name: str | None = "logits") -> Value:
        return self.emit("last_logits", x, name=name)

    def logits(self, x: Value, name: str | None = "logits") -> Value:
        """What an entry returns from the output projection [n, vocab]: the last position's
        logits as f32[vocab], or in a batched entry every row's, as f32[batch, vocab]."""
        if self.batched:
            return self.cast(x, "float32", name=name)
        return self.last_logits(x, name=name)
