"""Sparse mixture of experts: the dense expert pattern becomes a grouped computation over slots.

A frontend writes an MoE MLP densely, every expert over every row:

    weights = moe_route(router_logits, top_k=k)                       # f32[n, E], 0 = not chosen
    o_e = linear(act(linear(h, gate_up_e)), down_e)   for e in 0..E-1   (or q_linear)
    y = moe_combine(weights, o_0, ..., o_{E-1})

`SparseMoE` rewrites it into the ops of mlcc.ir.moe_ops, which compute each expert only for the
rows routed to it (top_k of E: 1/4 of the work for Mixtral's 2 of 8) and keep per-expert
intermediates at [n, k, features] instead of E tensors of [n, features]:

    slot_rows, offsets, row_slots = moe_dispatch(weights, top_k=k)
    y = moe_reduce(moe_linear(act(moe_linear(h, slot_rows, offsets, gate_up_0.., gather=True)),
                              slot_rows, offsets, down_0.., gather=False), weights, row_slots)

The rewrite is exact: slot results are rounded where the dense ops round, and moe_reduce adds
the weighted results in the order moe_combine does. Parameters are untouched (per-expert
tensors, as convert_weight stores them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.ir import Module, Node, TensorType, Value
from mlcc.passes.base import FunctionView, Pass, Rewrite, map_functions, rewrite_function
from mlcc.passes.cleanup import eliminate_dead_code

ACTIVATIONS = ("silu_mul", "gelu_mul")
# dense projection -> (its grouped op, weight inputs after x)
LINEARS = {"linear": ("moe_linear", 1), "q_linear": ("q_moe_linear", 2)}
QUANT_ATTRS = ("bits", "group_size", "in_features")


@dataclass(frozen=True)
class _Expert:
    x: Value
    first: Node  # x -> gate/up projection
    act: Node
    second: Node  # activation -> down projection


def _match_expert(out: Value, view: FunctionView) -> _Expert | None:
    second = view.producer_of(out)
    if second is None or second.op not in LINEARS or not view.single_use(out):
        return None
    act = view.producer_of(second.inputs[0])
    if act is None or act.op not in ACTIVATIONS or not view.single_use(act.output):
        return None
    first = view.producer_of(act.inputs[0])
    if first is None or first.op != second.op or not view.single_use(first.output):
        return None
    for proj in (first, second):
        weights = proj.inputs[1:]
        # No bias, and weights that are parameters: the grouped kernels read them per expert.
        if len(weights) != LINEARS[proj.op][1] or any(w.kind != "param" for w in weights):
            return None
        if proj.attrs.get("out_dtype") is not None:  # results stay in the activation dtype
            return None
    return _Expert(first.inputs[0], first, act, second)


def _same_structure(experts: list[_Expert]) -> bool:
    head = experts[0]
    return all(e.x is head.x and e.act.op == head.act.op and e.act.attrs == head.act.attrs
               and e.first.attrs == head.first.attrs and e.second.attrs == head.second.attrs
               and e.first.inputs[1].type == head.first.inputs[1].type
               and e.second.inputs[1].type == head.second.inputs[1].type for e in experts)


def _slots(name: str, like: Value, n, k: int, features: int) -> Value:
    return Value(name, TensorType(like.dtype, (n, k, features)))


def rule_sparse_moe(node: Node, view: FunctionView) -> Rewrite | None:
    """moe_combine over dense experts fed by moe_route -> dispatch / grouped linears / reduce."""
    if node.op != "moe_combine":
        return None
    weights, outs = node.inputs[0], node.inputs[1:]
    route = view.producer_of(weights, "moe_route")
    experts = [_match_expert(o, view) for o in outs]
    if route is None or any(e is None for e in experts) or not _same_structure(experts):
        return None
    head, k, base = experts[0], route.attrs["top_k"], node.output.name
    n = weights.shape[0]
    slot_rows = Value(f"{base}.slot_rows", TensorType("int32", (n, k)))
    offsets = Value(f"{base}.expert_offsets", TensorType("int32", (len(outs) + 1,)))
    row_slots = Value(f"{base}.row_slots", TensorType("int32", (n, k)))
    op = LINEARS[head.first.op][0]
    up = _slots(f"{base}.gate_up", head.first.output, n, k, head.first.output.shape[-1])
    act = _slots(f"{base}.act", head.act.output, n, k, head.act.output.shape[-1])
    down = _slots(f"{base}.down", head.second.output, n, k, head.second.output.shape[-1])
    first_w = tuple(w for e in experts for w in e.first.inputs[1:])
    second_w = tuple(w for e in experts for w in e.second.inputs[1:])
    first_attrs = {a: v for a, v in head.first.attrs.items() if a in QUANT_ATTRS}
    second_attrs = {a: v for a, v in head.second.attrs.items() if a in QUANT_ATTRS}
    new_nodes = [
        Node("moe_dispatch", (weights,), (slot_rows, offsets, row_slots), {"top_k": k}),
        Node(op, (head.x, slot_rows, offsets) + first_w, (up,),
             {**first_attrs, "gather": True}),
        Node(head.act.op, (up,), (act,), head.act.attrs),
        Node(op, (act, slot_rows, offsets) + second_w, (down,),
             {**second_attrs, "gather": False}),
        Node("moe_reduce", (down, weights, row_slots), node.outputs, {}),
    ]
    dense = [m for e in experts for m in (e.first, e.act, e.second)]
    return Rewrite(new_nodes, {}, remove=dense)


@dataclass(frozen=True)
class SparseMoE(Pass):
    """Dense MoE experts (moe_route ... moe_combine) -> grouped computation over routed slots.

    Requires: experts written as linear/q_linear -> silu_mul/gelu_mul -> linear/q_linear on the
    same input, without bias, feeding `moe_combine` whose weights come from `moe_route`; run
    after quantize_weights so quantized experts are matched too. Guarantees: no `moe_combine`
    of matched experts remains; every expert projection runs only on its routed rows.
    """

    name: ClassVar[str] = "sparse_moe"

    def run(self, module: Module) -> Module:
        return map_functions(module, lambda fn: eliminate_dead_code(
            rewrite_function(fn, [rule_sparse_moe])))
