"""Local fusions, written as pattern rules applied by the rewrite driver.

- fuse_qkv_attention: split(qkv) -> reshape -> [rope] -> attention -> reshape becomes one
  `qkv_attention` node reading the fused QKV projection (the backend's attention kernels read
  q, k and v straight from that buffer and write the cache in place).
- fuse_add_norm: a residual add feeding an RMSNorm/LayerNorm becomes `add_rms_norm` /
  `add_layer_norm`, which returns both the normalized value and the sum.
- lm_head_last_row: the output projection runs on the last position only, since only its
  logits are returned; it keeps its attributes (out_dtype="float32" in a float16 model).
- collapse_reshapes: reshape of reshape, and reshape to the same shape, disappear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.ir import Module, Node, TensorType, Value
from mlcc.passes.base import FunctionView, Pass, Rewrite, map_functions, rewrite_function
from mlcc.passes.cleanup import eliminate_dead_code


def _through_reshape(value: Value, view: FunctionView) -> Value | None:
    node = view.producer_of(value, "reshape")
    return node.inputs[0] if node is not None else None


def _head_source(value: Value, view: FunctionView):
    """For q or k: (pre-reshape value, rope node or None)."""
    rope = view.producer_of(value, "rope")
    if rope is not None:
        value = rope.inputs[0]
    return _through_reshape(value, view), rope


def rule_qkv_attention(node: Node, view: FunctionView) -> Rewrite | None:
    if node.op != "attention":
        return None
    q, k, v, cache = node.inputs
    (q_src, q_rope), (k_src, k_rope) = _head_source(q, view), _head_source(k, view)
    v_src = _through_reshape(v, view)
    if q_src is None or k_src is None or v_src is None:
        return None
    split = view.producer_of(q_src, "split")
    if split is None or split.outputs != (q_src, k_src, v_src) or split.inputs[0].type.rank != 2:
        return None
    if (q_rope is None) != (k_rope is None):
        return None
    if q_rope is not None and (q_rope.attrs != k_rope.attrs or q_rope.inputs[1] is not k_rope.inputs[1]):
        return None
    qkv = split.inputs[0]
    n, hq, d = q.shape
    rope_attrs = {"rope_theta": 1.0, "rotary_dim": 0, "rope_style": "rotate_half",
                  "rope_scaling": None}
    inputs_pos = None
    if q_rope is not None:
        rope_attrs = {"rope_theta": q_rope.attrs["theta"], "rotary_dim": q_rope.attrs["rotary_dim"],
                      "rope_style": q_rope.attrs["style"], "rope_scaling": q_rope.attrs["scaling"]}
        inputs_pos = q_rope.inputs[1]
    if inputs_pos is None:
        pos_node = next((m for m in view.fn.nodes if m.op == "positions"
                         and m.inputs[0] is cache), None)
        if pos_node is None:
            return None
        inputs_pos = pos_node.output
    flat = Value(node.output.name + ".flat", TensorType(q.dtype, (n, hq * d)))
    fused = Node("qkv_attention", (qkv, inputs_pos, cache), (flat,),
                 {"layer": node.attrs["layer"], "num_q_heads": hq, "scale": node.attrs["scale"],
                  "batched": node.attrs["batched"], **rope_attrs})
    back = Node("reshape", (flat,), (node.output,), {"shape": (n, hq, d)})
    return Rewrite([fused, back], {})


def rule_collapse_reshape(node: Node, view: FunctionView) -> Rewrite | None:
    if node.op != "reshape":
        return None
    src = node.inputs[0]
    if src.type == node.output.type:
        return Rewrite([], {id(node.output): src})
    inner = view.producer_of(src, "reshape")
    if inner is not None:
        origin = inner.inputs[0]
        if origin.type == node.output.type:
            return Rewrite([], {id(node.output): origin})
        return Rewrite([Node("reshape", (origin,), node.outputs, node.attrs)], {})
    return None


def rule_add_norm(node: Node, view: FunctionView) -> Rewrite | None:
    if node.op != "add" or node.inputs[0].type != node.inputs[1].type:
        return None
    total = node.output
    norm = next((u for u in view.uses.get(id(total), [])
                 if u.op in ("rms_norm", "layer_norm") and u.inputs[0] is total), None)
    if norm is None:
        return None
    fused_op = "add_rms_norm" if norm.op == "rms_norm" else "add_layer_norm"
    fused = Node(fused_op, node.inputs + norm.inputs[1:], (norm.output, total), norm.attrs)
    return Rewrite([fused], {}, remove=[norm])


def rule_lm_head_last_row(node: Node, view: FunctionView) -> Rewrite | None:
    if node.op != "last_logits":
        return None
    proj = view.producer_of(node.inputs[0])
    if proj is None or proj.op not in ("linear", "q_linear") or not view.single_use(proj.output):
        return None
    x = proj.inputs[0]
    if x.type.rank != 2 or x.shape[0] == 1:
        return None
    row = Value(x.name + ".last", TensorType(x.dtype, (1, x.shape[1])))
    logits_row = Value(proj.output.name + ".last",
                       TensorType(proj.output.dtype, (1, proj.output.shape[1])))
    new_nodes = [Node("last_row", (x,), (row,), {}),
                 Node(proj.op, (row,) + proj.inputs[1:], (logits_row,), proj.attrs),
                 Node("last_logits", (logits_row,), node.outputs, {})]
    return Rewrite(new_nodes, {}, remove=[proj])


def _apply(module: Module, *rules) -> Module:
    return map_functions(module, lambda fn: eliminate_dead_code(rewrite_function(fn, rules)))


@dataclass(frozen=True)
class FuseQKVAttention(Pass):
    """split/reshape/rope/attention over a fused QKV projection -> `qkv_attention`.

    Requires: attention inputs produced by the split-of-QKV pattern the frontends emit.
    Guarantees: no `attention` or `rope` node remains when the pattern matched; dead shape nodes
    are removed.
    """

    name: ClassVar[str] = "fuse_qkv_attention"

    def run(self, module: Module) -> Module:
        return _apply(module, rule_qkv_attention, rule_collapse_reshape)


@dataclass(frozen=True)
class FuseAddNorm(Pass):
    """Residual add + RMSNorm/LayerNorm -> one node returning (normalized, sum)."""

    name: ClassVar[str] = "fuse_add_norm"

    def run(self, module: Module) -> Module:
        return _apply(module, rule_add_norm)


@dataclass(frozen=True)
class LMHeadLastRow(Pass):
    """Runs the output projection on the last position only (prefill returns its logits)."""

    name: ClassVar[str] = "lm_head_last_row"

    def run(self, module: Module) -> Module:
        return _apply(module, rule_lm_head_last_row)
