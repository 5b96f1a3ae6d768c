"""The op registry: one `OpDef` per op, declaring everything the IR needs to know about it.

An OpDef holds the op's attributes (with types and defaults), how many inputs it takes, its
type/shape rule (`infer`), an optional extra verifier rule, an optional printed form, and its
NumPy reference (`reference`), which is the semantics of record used by the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlcc.ir.types import Type

REQUIRED = object()


class TypeRuleError(Exception):
    """Raised by an op's type rule or verifier rule; the verifier adds the node and context."""


@dataclass(frozen=True)
class AttrSpec:
    name: str
    types: tuple[type, ...]
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class EvalContext:
    """What a reference implementation may read besides its inputs."""

    bindings: dict[str, int]  # symbol name -> value in this call
    kv_caches: dict[int, Any]  # id(cache value) -> interpreter cache state


InferFn = Callable[[Sequence[Type], Mapping[str, Any]], tuple[Type, ...]]
ReferenceFn = Callable[[EvalContext, Sequence[Any], Mapping[str, Any]], tuple[Any, ...]]


@dataclass(frozen=True)
class OpDef:
    name: str
    attrs: tuple[AttrSpec, ...]
    num_inputs: tuple[int, int | None]  # (min, max); max None = variadic
    infer: InferFn
    reference: ReferenceFn
    verify: Callable[[Sequence[Type], Mapping[str, Any]], None] | None = None
    printed: Callable[[Sequence[str], Mapping[str, Any]], str] | None = None
    side_effect: bool = False
    doc: str = ""

    def attr_spec(self, name: str) -> AttrSpec | None:
        for spec in self.attrs:
            if spec.name == name:
                return spec
        return None

    def complete_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and check names and types; raises TypeRuleError."""
        out: dict[str, Any] = {}
        for key in attrs:
            if self.attr_spec(key) is None:
                known = ", ".join(s.name for s in self.attrs) or "none"
                raise TypeRuleError(f"unknown attribute {key!r} (known: {known})")
        for spec in self.attrs:
            if spec.name in attrs:
                value = attrs[spec.name]
                if isinstance(value, list):
                    value = tuple(value)
                if not isinstance(value, spec.types) or (
                    isinstance(value, bool) and bool not in spec.types
                ):
                    wanted = " or ".join(t.__name__ for t in spec.types)
                    raise TypeRuleError(
                        f"attribute {spec.name}={value!r} must be {wanted}, "
                        f"got {type(value).__name__}"
                    )
                out[spec.name] = value
            elif spec.required:
                raise TypeRuleError(f"missing required attribute {spec.name!r}")
            else:
                out[spec.name] = spec.default
        return out


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    OPS[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
