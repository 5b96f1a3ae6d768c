"""Model dtype legalization: build once in float32, compile for float16 activations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mlcc.ir import Function, KVCacheType, Module, Node, Param, TensorType, Value, param_value
from mlcc.ir.registry import get_op
from mlcc.passes.base import Pass


def _convert(t, src: str, dst: str):
    if isinstance(t, TensorType) and t.dtype == src:
        return TensorType(dst, t.shape)
    if isinstance(t, KVCacheType) and t.dtype == src:
        return dataclasses.replace(t, dtype=dst)
    return t


def retype_function(fn: Function, params: dict[str, Param], src: str, dst: str) -> Function:
    """Rebuild `fn` with inputs of dtype src turned into dst; node types are re-inferred."""
    mapping: dict[int, Value] = {}
    inputs = []
    for value in fn.inputs:
        new = Value(value.name, _convert(value.type, src, dst), value.kind)
        mapping[id(value)] = new
        inputs.append(new)
    nodes = []
    for node in fn.nodes:
        new_inputs = []
        for value in node.inputs:
            if value.kind == "param":
                new_inputs.append(param_value(params[value.name]))
            else:
                new_inputs.append(mapping[id(value)])
        out_types = get_op(node.op).infer([v.type for v in new_inputs], node.attrs)
        outs = tuple(Value(v.name, t) for v, t in zip(node.outputs, out_types))
        for old, new in zip(node.outputs, outs):
            mapping[id(old)] = new
        nodes.append(Node(node.op, tuple(new_inputs), outs, node.attrs))
    outputs = tuple(param_value(params[v.name]) if v.kind == "param" else mapping[id(v)]
                    for v in fn.outputs)
    return fn.replace(inputs=tuple(inputs), nodes=tuple(nodes), outputs=outputs)


@dataclass(frozen=True)
class ConvertModelDType(Pass):
    """Turns float32 parameters, activations and the KV cache into `dtype`.

    Requires: a verified module whose float values are float32. Guarantees: every float32 value
    except those an op's rule fixes at float32 (the last position's logits) becomes `dtype`.
    """

    name: ClassVar[str] = "convert_model_dtype"
    dtype: str = "float16"

    def run(self, module: Module) -> Module:
        if self.dtype == "float32":
            return module
        params = {p.name: Param(p.name, _convert(p.type, "float32", self.dtype), p.annotations)
                  for p in module.params}
        functions = [retype_function(fn, params, "float32", self.dtype)
                     for fn in module.functions]
        module = module.with_params(params.values())
        for fn in functions:
            module = module.with_function(fn)
        return module.with_attrs(model_dtype=self.dtype)
