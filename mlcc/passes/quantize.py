"""Quantization fusion: dequantization folded into the matmuls and the embedding lookup.

The scheme (from mlcc.quant) says which parameters are stored quantized and under which names;
this pass swaps each such parameter for its stored parts and each `linear` / `embedding` that
reads it for `q_linear` / `q_embedding`, which dequantize on the fly. No dequantized weight is
ever materialized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.ir import Module, Node, Param, TensorType, Value, param_value
from mlcc.passes.base import Pass, map_functions
from mlcc.quant import get_scheme


@dataclass(frozen=True)
class _ParamView:
    name: str
    shape: tuple[int, ...]
    kind: str


def stored_params(module: Module, scheme_name: str) -> dict[str, tuple[Param, ...]]:
    """Parameter name -> the params it is stored as under the scheme (itself when unquantized)."""
    scheme = get_scheme(scheme_name)
    result = {}
    for p in module.params:
        view = _ParamView(p.name, tuple(p.type.shape), p.annotations.get("kind", "other"))
        parts = scheme.stored_tensors(view)
        if scheme.applies_to(view):
            result[p.name] = tuple(
                Param(t.name, TensorType(t.dtype, tuple(t.shape)),
                      {**p.annotations, "quantized_from": p.name, "part": t.name.rsplit(".", 1)[1]})
                for t in parts)
        else:
            result[p.name] = (p,)
    return result


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Replaces quantizable parameters by their stored parts and fuses dequantization.

    Requires: parameters annotated with `kind`, model dtype already legalized. Guarantees: no
    `linear`/`embedding` reads a quantized parameter; `q_linear`/`q_embedding` read `q_weight`
    and `q_scale`, a `q_linear` keeps its linear's out_dtype; parameters appear in the order
    convert_weight stores them.
    """

    name: ClassVar[str] = "quantize_weights"
    scheme: str = "q0f32"

    def run(self, module: Module) -> Module:
        scheme = get_scheme(self.scheme)
        if scheme.kind == "none":
            return module.with_attrs(quantization=self.scheme)
        if scheme.kind != "group":
            raise NotImplementedError(
                f"[compile] quantization {self.scheme!r} ({scheme.kind}) has no fused kernels "
                "yet; use q4f16_1, q4f32_1, q3f16_1, q8f16_1, q0f16 or q0f32")
        parts = stored_params(module, self.scheme)

        def rewrite(fn):
            nodes = []
            for node in fn.nodes:
                nodes.append(self._rewrite_node(node, parts, scheme))
            return fn.replace(nodes=tuple(nodes))

        module = map_functions(module, rewrite)
        params = [q for p in module.params for q in parts[p.name]]
        return module.with_params(params).with_attrs(quantization=self.scheme)

    def _rewrite_node(self, node: Node, parts, scheme) -> Node:
        def quantized(value: Value) -> tuple[Value, Value] | None:
            if value.kind != "param" or len(parts.get(value.name, ())) != 2:
                return None
            qw, qs = parts[value.name]
            return param_value(qw), param_value(qs)

        attrs = None
        if node.op == "linear" and (q := quantized(node.inputs[1])):
            k = node.inputs[1].shape[1]
            attrs = {"bits": scheme.bits, "group_size": scheme.group_size, "in_features": k,
                     "out_dtype": node.attrs["out_dtype"]}
            return Node("q_linear", (node.inputs[0],) + q + node.inputs[2:], node.outputs, attrs)
        if node.op == "embedding" and (q := quantized(node.inputs[0])):
            k = node.inputs[0].shape[1]
            attrs = {"bits": scheme.bits, "group_size": scheme.group_size, "in_features": k}
            return Node("q_embedding", q + (node.inputs[1],), node.outputs, attrs)
        for value in node.inputs:
            if quantized(value) is not None:
                raise NotImplementedError(
                    f"[compile] {node.op} reads quantized parameter @{value.name}; only linear "
                    "and embedding can read quantized weights")
        return node
