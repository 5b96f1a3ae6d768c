"""A readable, stable text form of modules and functions (used by golden tests and --debug-dump).

    func decode(%token: i32[1], %kv_cache: kv_cache<...>) -> f32[512] {
      %pos = positions(%kv_cache, length=1) : i32[1]
      %h = embedding(@model.embed_tokens.weight, %token) : f32[1, 64]
      ...
      return %logits
    }
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlcc.ir.core import Function, Module, Node
from mlcc.ir.registry import get_op
from mlcc.ir.types import Sym


def format_attr(value: Any) -> str:
    if isinstance(value, Sym):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                         for v in value):
            return "{" + ", ".join(f"{k}={format_attr(v)}" for k, v in value) + "}"
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={format_attr(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_attrs(attrs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_attr(v)}" for k, v in attrs.items())


def shown_attrs(node: Node) -> dict[str, Any]:
    """Attributes worth printing: those not at their declared default."""
    opdef = get_op(node.op)
    shown = {}
    for key, value in node.attrs.items():
        spec = opdef.attr_spec(key)
        if spec is not None and not spec.required and value == spec.default \
                and type(value) is type(spec.default):
            continue
        shown[key] = value
    return shown


def format_node(node: Node) -> str:
    opdef = get_op(node.op)
    args = [v.ref for v in node.inputs]
    if opdef.printed is not None:
        call = opdef.printed(args, node.attrs)
    else:
        attrs = format_attrs(shown_attrs(node))
        call = f"{node.op}({', '.join(args)}{', ' if args and attrs else ''}{attrs})"
    lhs = ", ".join(v.ref for v in node.outputs)
    types = ", ".join(str(v.type) for v in node.outputs)
    return f"{lhs} = {call} : {types}"


def print_function(fn: Function) -> str:
    params = ", ".join(f"{v.ref}: {v.type}" for v in fn.inputs)
    results = ", ".join(str(v.type) for v in fn.outputs)
    attrs = f" {{{format_attrs(fn.attrs)}}}" if fn.attrs else ""
    lines = [f"func {fn.name}({params}) -> ({results}){attrs} {{"]
    lines += [f"  {format_node(node)}" for node in fn.nodes]
    lines.append(f"  return {', '.join(v.ref for v in fn.outputs)}")
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    attrs = f" {{{format_attrs(module.attrs)}}}" if module.attrs else ""
    lines = [f"module {module.name}{attrs}"]
    for p in module.params:
        notes = f" {{{format_attrs(p.annotations)}}}" if p.annotations else ""
        lines.append(f"param @{p.name} : {p.type}{notes}")
    for fn in module.functions:
        lines.append("")
        lines.append(print_function(fn))
    return "\n".join(lines) + "\n"
