"""The graph IR: values, nodes, functions and modules.

Everything here is an immutable value. A Function is an ordered list of SSA nodes; a pass that
changes a function builds a new one (`Function.replace`, `Module.with_function`) rather than
editing the old one. Parameters (model weights) live on the Module and are referenced from
functions as values of kind "param".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mlcc.ir.types import Dim, KVCacheType, Sym, TensorType, Type


def freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy of `mapping` (lists become tuples so values stay hashable-ish)."""
    items = {}
    for key, value in (mapping or {}).items():
        items[key] = tuple(value) if isinstance(value, list) else value
    return MappingProxyType(items)


@dataclass(frozen=True, eq=False)
class Value:
    """A typed SSA value: a function input, a parameter, or a node output.

    Values compare by identity: two values with the same name in different functions are
    different values. `kind` is "input", "param" or "node".
    """

    name: str
    type: Type
    kind: str = "node"

    def __repr__(self) -> str:
        return f"Value({self.ref}: {self.type})"

    @property
    def ref(self) -> str:
        return f"@{self.name}" if self.kind == "param" else f"%{self.name}"

    @property
    def shape(self) -> tuple[Dim, ...]:
        assert isinstance(self.type, TensorType), f"{self.ref} is not a tensor"
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    # Operators make builder code read like the math; they need an active FunctionBuilder.
    def __add__(self, other: Value) -> Value:
        return _active_builder().add(self, other)

    def __mul__(self, other: Value) -> Value:
        return _active_builder().mul(self, other)

    def __matmul__(self, other: Value) -> Value:
        return _active_builder().matmul(self, other)


def _active_builder():
    from mlcc.ir.builder import current_builder

    return current_builder()


@dataclass(frozen=True)
class Param:
    """A model parameter: name, type, and annotations such as `kind` or `quant`."""

    name: str
    type: TensorType
    annotations: Mapping[str, Any] = field(default_factory=lambda: freeze({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", freeze(self.annotations))

    @property
    def value(self) -> Value:
        return param_value(self)

    def annotated(self, **annotations: Any) -> Param:
        return Param(self.name, self.type, {**self.annotations, **annotations})


_PARAM_VALUES: dict[tuple[str, TensorType], Value] = {}


def param_value(param: Param) -> Value:
    """The one Value that stands for `param` in every function (interned by name and type)."""
    key = (param.name, param.type)
    if key not in _PARAM_VALUES:
        _PARAM_VALUES[key] = Value(param.name, param.type, "param")
    return _PARAM_VALUES[key]


@dataclass(frozen=True, eq=False)
class Node:
    """One operation: `outputs = op(inputs, attrs)`."""

    op: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: Mapping[str, Any] = field(default_factory=lambda: freeze({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", freeze(self.attrs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]


@dataclass(frozen=True)
class Function:
    """An entry point: typed inputs, an ordered list of nodes, and outputs."""

    name: str
    inputs: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    attrs: Mapping[str, Any] = field(default_factory=lambda: freeze({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", freeze(self.attrs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    def replace(self, **changes: Any) -> Function:
        return dataclasses.replace(self, **changes)

    @property
    def symbols(self) -> frozenset[Sym]:
        syms: set[Sym] = set()
        for value in self.inputs:
            syms |= value.type.symbols
        return frozenset(syms)

    def params_used(self) -> list[Value]:
        """Parameter values read by this function, in first-use order."""
        seen: dict[str, Value] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value.kind == "param" and value.name not in seen:
                    seen[value.name] = value
        return list(seen.values())

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> nodes that read it."""
        uses: dict[int, list[Node]] = {}
        for node in self.nodes:
            for value in node.inputs:
                uses.setdefault(id(value), []).append(node)
        return uses


@dataclass(frozen=True)
class Module:
    """Named functions plus the model's parameters and attributes."""

    name: str
    functions: tuple[Function, ...] = ()
    params: tuple[Param, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=lambda: freeze({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", freeze(self.attrs))
        object.__setattr__(self, "functions", tuple(self.functions))
        object.__setattr__(self, "params", tuple(self.params))

    def function(self, name: str) -> Function:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise KeyError(f"module {self.name!r} has no function {name!r}; "
                       f"it has {[f.name for f in self.functions]}")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"module {self.name!r} has no parameter {name!r}")

    def has_param(self, name: str) -> bool:
        return any(p.name == name for p in self.params)

    def with_function(self, fn: Function) -> Module:
        """A module with `fn` added, or replacing the function of the same name in place."""
        names = [f.name for f in self.functions]
        if fn.name in names:
            funcs = tuple(fn if f.name == fn.name else f for f in self.functions)
        else:
            funcs = self.functions + (fn,)
        return dataclasses.replace(self, functions=funcs)

    def with_params(self, params: Iterable[Param]) -> Module:
        return dataclasses.replace(self, params=tuple(params))

    def with_attrs(self, **attrs: Any) -> Module:
        return dataclasses.replace(self, attrs={**self.attrs, **attrs})

    def add_param(self, name: str, shape: tuple[Dim, ...], dtype: str, **annotations: Any) -> Value:
        """Not available on an immutable module: use `ModuleBuilder.add_param`."""
        raise TypeError("Module is immutable; build parameters with mlcc.ir.ModuleBuilder")


def kv_cache_type(value: Value) -> KVCacheType:
    assert isinstance(value.type, KVCacheType), f"{value.ref} is not a KV cache"
    return value.type
