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


LINEAR_OPS = ("linear", "q_linear")


def logits_projections(fn: Function) -> set[int]:
    """id() of the linear nodes whose result is only turned into the returned float32 logits:
    read by `last_logits` alone, or by a cast to float32 that the function returns."""
    users = fn.users()
    returned = {id(v) for v in fn.outputs}
    found = set()
    for node in fn.nodes:
        if node.op not in LINEAR_OPS or id(node.output) in returned:
            continue
        readers = users.get(id(node.output), [])
        if len(readers) != 1:
            continue
        reader = readers[0]
        if reader.op == "last_logits" or (
                reader.op == "cast" and reader.attrs["dtype"] == "float32"
                and id(reader.output) in returned):
            found.add(id(node))
    return found


def retype_function(fn: Function, params: dict[str, Param], src: str, dst: str,
                    float32_results: frozenset[int] | set[int] = frozenset()) -> Function:
    """Rebuild `fn` with inputs of dtype src turned into dst; node types are re-inferred.

    Linear nodes whose id() is in `float32_results` get out_dtype="float32": they keep
    writing float32 whatever their inputs become.
    """
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
        attrs = node.attrs
        if id(node) in float32_results:
            attrs = {**attrs, "out_dtype": "float32"}
        out_types = get_op(node.op).infer([v.type for v in new_inputs], attrs)
        outs = tuple(Value(v.name, t) for v, t in zip(node.outputs, out_types))
        for old, new in zip(node.outputs, outs):
            mapping[id(old)] = new
        nodes.append(Node(node.op, tuple(new_inputs), outs, attrs))
    outputs = tuple(param_value(params[v.name]) if v.kind == "param" else mapping[id(v)]
                    for v in fn.outputs)
    return fn.replace(inputs=tuple(inputs), nodes=tuple(nodes), outputs=outputs)


@dataclass(frozen=True)
class ConvertModelDType(Pass):
    """Turns float32 parameters, activations and the KV cache into `dtype`.

    Requires: a verified module whose float values are float32. Guarantees: every float32 value
    becomes `dtype` except those an op's rule fixes at float32 (the last position's logits) and
    the result of the output projection (the linear whose only reader turns it into the
    returned logits), which gets out_dtype="float32": its float32 sum becomes the logits
    unrounded, so two logits closer than one `dtype` step stay apart for greedy choice.
    """

    name: ClassVar[str] = "convert_model_dtype"
    dtype: str = "float16"

    def run(self, module: Module) -> Module:
        if self.dtype == "float32":
            return module
        params = {p.name: Param(p.name, _convert(p.type, "float32", self.dtype), p.annotations)
                  for p in module.params}
        functions = [retype_function(fn, params, "float32", self.dtype, logits_projections(fn))
                     for fn in module.functions]
        module = module.with_params(params.values())
        for fn in functions:
            module = module.with_function(fn)
        return module.with_attrs(model_dtype=self.dtype)
