"""Tensor-parallel sharding: the program of one rank out of N, with all_reduce where needed.

Which parameters split is read off the graph, not off names (Megatron-style pairs):
- a `linear`/`q_linear` whose input is whole on every rank is *column-parallel* when everything
  downstream of its output, through ops that act per feature or per head (split, reshape,
  rope, attention, silu_mul, gelu, ...), ends as the input of another linear; each rank then
  computes a slice of the output features. The slice follows the consumer: a q/k/v split is
  sliced per segment (key/value heads are shared by several ranks when there are fewer of them
  than shards), a fused gate/up is sliced per half;
- that other linear is *row-parallel*: its weight is sliced along the input features, each rank
  computes a partial sum, and an `all_reduce` restores the full result where a value is needed
  whole (partial sums pass through `add` of two partials and `moe_combine`, so the two branches
  of a parallel residual or all experts of a MoE layer share one all_reduce);
- everything else (embedding, norms, the output projection, MoE routers) is replicated.
Quantized weights split along whole groups: rows of q_weight/q_scale for column-parallel,
whole groups of K for row-parallel. The KV cache holds each rank's key/value heads.

Every parameter of the result carries its `ShardSpec` (annotation `shard`), which says how the
unsharded array (as convert_weight stores it) is sliced for a rank. The module records
`tensor_parallel_shards`; rank does not appear in the program: all ranks run the same program
on different weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mlcc.errors import MlccError
from mlcc.ir import Function, KVCacheType, Module, Node, Param, TensorType, Value, get_op
from mlcc.ir.collective import ShardSpec
from mlcc.ir.core import param_value
from mlcc.passes.base import Pass

STAGE = "compile"
LINEAR_OPS = ("linear", "q_linear")
# Ops that act on each feature (or each head) separately: a value split along an axis other
# than the one they reduce stays split the same way.
UNARY_OPS = ("gelu", "silu", "scale", "cast", "scale_in_dtype")
GATED_OPS = ("silu_mul", "gelu_mul")
REP, PARTIAL = "rep", "partial"


@dataclass(frozen=True)
class Split:
    """A value that each rank holds a slice of, along `axis`, cut per `segments`."""

    axis: int
    segments: tuple[tuple[int, int], ...]
    origins: frozenset[int]  # column-parallel linears (node index) this slice comes from


@dataclass
class _Analysis:
    """What one function's sharding looks like, or which column candidates must give up."""

    states: dict[int, Any] = field(default_factory=dict)
    specs: dict[str, ShardSpec] = field(default_factory=dict)
    attrs: dict[int, dict[str, Any]] = field(default_factory=dict)  # node index -> new attrs
    reduce: dict[int, list[int]] = field(default_factory=dict)  # node index -> inputs to sum
    reduce_outputs: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed: frozenset[int] = frozenset()
    kv_parts: set[int] = field(default_factory=set)


def _fail(message: str) -> MlccError:
    return MlccError(STAGE, f"tensor parallelism: {message}")


class _Sharder:
    """Analyses one function for `shards` ranks with some column candidates ruled out."""

    def __init__(self, fn: Function, shards: int, blocked: frozenset[int]) -> None:
        self.fn, self.shards, self.blocked = fn, shards, blocked
        self.users = fn.users()
        self.a = _Analysis()

    def state(self, value: Value):
        return self.a.states.get(id(value), REP)

    def run(self) -> _Analysis:
        failed: set[int] = set()
        for index, node in enumerate(self.fn.nodes):
            try:
                self.visit(index, node)
            except _Giveup as giveup:
                failed |= giveup.origins
                for v in node.outputs:
                    self.a.states[id(v)] = REP
        for i, value in enumerate(self.fn.outputs):
            s = self.state(value)
            if isinstance(s, Split):
                failed |= s.origins
            elif s == PARTIAL:
                self.a.reduce_outputs.append(i)
        self.a.failed = frozenset(failed)
        return self.a

    # --- per-node rules -------------------------------------------------------------------

    def visit(self, index: int, node: Node) -> None:
        states = [self.state(v) for v in node.inputs]
        splits = [s for s in states if isinstance(s, Split)]
        if node.op in LINEAR_OPS and node.inputs[1].kind == "param":
            self.visit_linear(index, node, states[0])
            return
        if node.op == "add" and states == [PARTIAL, PARTIAL]:
            self.a.states[id(node.output)] = PARTIAL
            return
        if node.op == "moe_combine" and states[0] == REP and all(s == PARTIAL
                                                                  for s in states[1:]):
            self.a.states[id(node.output)] = PARTIAL
            return
        partial = [i for i, s in enumerate(states) if s == PARTIAL]
        if partial:
            self.a.reduce[index] = partial
        if not splits:
            return
        rule = _RULES.get(node.op)
        if rule is None:
            raise _Giveup(frozenset().union(*(s.origins for s in splits)))
        rule(self, index, node, states)

    def visit_linear(self, index: int, node: Node, x_state) -> None:
        weight = node.inputs[1]
        if isinstance(x_state, Split):
            self.row_parallel(index, node, x_state)
        elif index not in self.blocked:
            if x_state == PARTIAL:
                self.a.reduce[index] = [0]
            segments = self.column_segments(node.output, weight.name)
            self.a.states[id(node.output)] = Split(node.output.type.rank - 1, segments,
                                                   frozenset({index}))
            # Weight rows, q_scale rows and bias entries are output features alike.
            for v in node.inputs[1:]:
                self.set_spec(v, ShardSpec(self.shards, 0, segments))
        elif x_state == PARTIAL:
            self.a.reduce[index] = [0]

    def row_parallel(self, index: int, node: Node, x: Split) -> None:
        weight = node.inputs[1]
        if x.axis != node.inputs[0].type.rank - 1 or any(p != self.shards
                                                         for _, p in x.segments):
            raise _Giveup(x.origins)
        self.a.states[id(node.output)] = PARTIAL
        if node.op == "linear":
            self.set_spec(weight, ShardSpec(self.shards, 1, x.segments))
            bias = node.inputs[2:]
        else:
            group, k = node.attrs["group_size"], node.attrs["in_features"]
            per_word = 32 // node.attrs["bits"]
            for size, parts in x.segments:
                if size % (parts * group):
                    self.a.errors.append(
                        f"{node.inputs[1].name}: {size} input features split into {parts} "
                        f"shards give {size / parts:g} per shard, not a whole number of "
                        f"{group}-element quantization groups; use a shard count that divides "
                        f"{size // group if size % group == 0 else size} groups")
                    return
            self.set_spec(node.inputs[1], ShardSpec(
                self.shards, 1, tuple((s // per_word, p) for s, p in x.segments)))
            self.set_spec(node.inputs[2], ShardSpec(
                self.shards, 1, tuple((s // group, p) for s, p in x.segments)))
            self.a.attrs[index] = {"in_features": k // self.shards}
            bias = node.inputs[3:]
        for b in bias:
            self.set_spec(b, ShardSpec(self.shards, rank_zero_only=True))

    def set_spec(self, value: Value, spec: ShardSpec) -> None:
        if value.kind != "param":
            return
        known = self.a.specs.setdefault(value.name, spec)
        if known != spec:  # an error only if this analysis is the final one
            self.a.errors.append(f"parameter {value.name} would be split two ways ({known} "
                                 f"and {spec}); it cannot be shared by these two products")

    # --- how a column-parallel output is sliced -------------------------------------------

    def column_segments(self, value: Value, name: str) -> tuple[tuple[int, int], ...]:
        features = value.type.shape[-1]
        consumer = self._single_consumer(value)
        if consumer is not None and consumer.op == "split" and consumer.attrs["axis"] in (
                -1, value.type.rank - 1):
            return tuple((size, self.head_parts(out, size, name, role))
                         for role, (size, out) in enumerate(zip(consumer.attrs["sizes"],
                                                                consumer.outputs)))
        if consumer is not None and consumer.op in GATED_OPS:
            return ((features // 2, self.shards), (features // 2, self.shards))
        if consumer is not None and consumer.op == "qkv_attention":
            cache = consumer.inputs[2].type
            hq, hkv, d = consumer.attrs["num_q_heads"], cache.num_kv_heads, cache.head_dim
            return ((hq * d, self.parts(hq, name, "query heads", False)),
                    (hkv * d, self.parts(hkv, name, "key/value heads", True)),
                    (hkv * d, self.parts(hkv, name, "key/value heads", True)))
        self.check_divides(features, self.shards, name, "output features")
        return ((features, self.shards),)

    def _single_consumer(self, value: Value) -> Node | None:
        while True:
            users = self.users.get(id(value), [])
            if len(users) != 1:
                return None
            if users[0].op in UNARY_OPS:
                value = users[0].output
                continue
            return users[0]

    def head_parts(self, value: Value, size: int, name: str, role: int) -> int:
        """Parts of one split segment: per head when it is reshaped into heads for attention."""
        for user in self.users.get(id(value), []):
            if user.op == "reshape" and len(user.attrs["shape"]) == value.type.rank + 1:
                heads = user.attrs["shape"][-2]
                if isinstance(heads, int) and heads * user.attrs["shape"][-1] == size:
                    feeds_kv = self._feeds_attention_kv(user.output)
                    what = "key/value heads" if feeds_kv else "query heads"
                    return self.parts(heads, name, what, feeds_kv)
        self.check_divides(size, self.shards, name, f"features of segment {role}")
        return self.shards

    def _feeds_attention_kv(self, value: Value) -> bool:
        for user in self.users.get(id(value), []):
            if user.op == "rope":
                return self._feeds_attention_kv(user.output)
            if user.op == "attention" and value is not user.inputs[0]:
                return True
        return False

    def parts(self, heads: int, name: str, what: str, may_share: bool) -> int:
        if heads % self.shards == 0:
            return self.shards
        if may_share and self.shards % heads == 0:
            return heads
        hint = (f"a divisor of {heads} or a multiple of it" if may_share
                else f"a divisor of {heads}")
        self.a.errors.append(f"{name}: {heads} {what} do not divide among "
                             f"{self.shards} shards; use tensor_parallel_shards = {hint}")
        return self.shards

    def check_divides(self, size: int, parts: int, name: str, what: str) -> None:
        if size % parts:
            self.a.errors.append(f"{name}: {size} {what} do not split into {parts} shards; "
                                 f"use a shard count that divides {size}")


class _Giveup(Exception):
    """A split value reached an op that needs it whole: its column-parallel origins give up."""

    def __init__(self, origins: frozenset[int]) -> None:
        super().__init__(sorted(origins))
        self.origins = origins


# --- rules for split values -----------------------------------------------------------------


def _rule_unary(sh: _Sharder, index: int, node: Node, states) -> None:
    sh.a.states[id(node.output)] = states[0]


def _rule_gated(sh: _Sharder, index: int, node: Node, states) -> None:
    s = states[0]
    if s.axis != node.inputs[0].type.rank - 1 or len(s.segments) != 2:
        raise _Giveup(s.origins)
    sh.a.states[id(node.output)] = Split(s.axis, s.segments[:1], s.origins)


def _rule_split(sh: _Sharder, index: int, node: Node, states) -> None:
    s = states[0]
    axis = node.attrs["axis"] % node.inputs[0].type.rank
    sizes = tuple(node.attrs["sizes"])
    if axis != s.axis or sizes != tuple(size for size, _ in s.segments):
        raise _Giveup(s.origins)
    for out, segment in zip(node.outputs, s.segments):
        sh.a.states[id(out)] = Split(axis, (segment,), s.origins)
    sh.a.attrs[index] = {"sizes": tuple(size // parts for size, parts in s.segments)}


def _rule_reshape(sh: _Sharder, index: int, node: Node, states) -> None:
    s = states[0]
    old, new = node.inputs[0].type.shape, tuple(node.attrs["shape"])
    prefix = 0
    while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
        prefix += 1
    if s.axis != prefix or len(s.segments) != 1 or prefix >= len(new):
        raise _Giveup(s.origins)
    parts, dim = s.segments[0][1], new[prefix]
    if not isinstance(dim, int):
        raise _Giveup(s.origins)
    if dim % parts:  # an error rather than a fallback: the head count rules out these shards
        sh.a.errors.append(f"reshape to {list(new)} in {sh.fn.name}: dim {dim} does not split "
                           f"into {parts} shards")
    local = list(new)
    local[prefix] = max(dim // parts, 1)
    sh.a.states[id(node.output)] = Split(prefix, ((dim, parts),), s.origins)
    sh.a.attrs[index] = {"shape": tuple(local)}


def _rule_rope(sh: _Sharder, index: int, node: Node, states) -> None:
    s = states[0]
    if not isinstance(s, Split) or s.axis >= node.inputs[0].type.rank - 1:
        raise _Giveup(s.origins if isinstance(s, Split) else states[1].origins)
    sh.a.states[id(node.output)] = s


def _rule_attention(sh: _Sharder, index: int, node: Node, states) -> None:
    q, k, v = states[:3]
    splits = [s for s in (q, k, v) if isinstance(s, Split)]
    origins = frozenset().union(*(s.origins for s in splits))
    if len(splits) != 3 or any(s.axis != 1 for s in splits) or k.segments != v.segments:
        raise _Giveup(origins)
    sh.a.kv_parts.add(k.segments[0][1])
    sh.a.states[id(node.output)] = q


def _rule_qkv_attention(sh: _Sharder, index: int, node: Node, states) -> None:
    s = states[0]
    if not isinstance(s, Split) or len(s.segments) != 3 or s.axis != 1:
        raise _Giveup(s.origins if isinstance(s, Split) else frozenset())
    (q_size, q_parts), (_, kv_parts), _ = s.segments
    sh.a.kv_parts.add(kv_parts)
    sh.a.states[id(node.output)] = Split(1, ((q_size, q_parts),), s.origins)
    sh.a.attrs[index] = {"num_q_heads": node.attrs["num_q_heads"] // q_parts}


def _rule_binary(sh: _Sharder, index: int, node: Node, states) -> None:
    a, b = states
    if not (isinstance(a, Split) and isinstance(b, Split) and a.axis == b.axis
            and a.segments == b.segments and node.inputs[0].type == node.inputs[1].type):
        origins = frozenset().union(*(s.origins for s in states if isinstance(s, Split)))
        raise _Giveup(origins)
    sh.a.states[id(node.output)] = Split(a.axis, a.segments, a.origins | b.origins)


_RULES = {
    **{op: _rule_unary for op in UNARY_OPS}, **{op: _rule_gated for op in GATED_OPS},
    "split": _rule_split, "reshape": _rule_reshape, "rope": _rule_rope,
    "attention": _rule_attention, "qkv_attention": _rule_qkv_attention,
    "add": _rule_binary, "mul": _rule_binary,
}


def analyse(fn: Function, shards: int) -> _Analysis:
    """Shard `fn`: column candidates that reach an op needing whole values give up, repeatedly,
    until every split value ends in a row-parallel linear."""
    blocked: frozenset[int] = frozenset()
    while True:
        analysis = _Sharder(fn, shards, blocked).run()
        if not analysis.failed:
            return analysis
        blocked |= analysis.failed


# --- the rewrite ----------------------------------------------------------------------------


def _local_cache(fn: Function, analysis: _Analysis, shards: int) -> KVCacheType | None:
    cache = next((v.type for v in fn.inputs if isinstance(v.type, KVCacheType)), None)
    if cache is None or not analysis.kv_parts:
        return cache
    if len(analysis.kv_parts) != 1:
        raise _fail(f"{fn.name}: attention layers split their key/value heads differently "
                    f"({sorted(analysis.kv_parts)})")
    parts = analysis.kv_parts.pop()
    analysis.kv_parts.add(parts)
    return KVCacheType(cache.num_layers, cache.num_kv_heads // parts, cache.head_dim,
                       cache.dtype, cache.capacity, cache.sliding_window, cache.sink_size)


def rewrite(fn: Function, analysis: _Analysis, params: dict[str, Param], shards: int
            ) -> Function:
    """The rank-independent program of one shard: local shapes, all_reduce after row-parallel
    products where the sum is needed."""
    mapped: dict[int, Value] = {}
    summed: dict[int, Value] = {}
    nodes: list[Node] = []
    cache_type = _local_cache(fn, analysis, shards)
    inputs = []
    for value in fn.inputs:
        new = Value(value.name, cache_type, "input") if isinstance(value.type, KVCacheType) \
            else value
        mapped[id(value)] = new
        inputs.append(new)

    def get(value: Value) -> Value:
        if value.kind == "param":
            return param_value(params[value.name])
        return mapped[id(value)]

    def reduced(value: Value) -> Value:
        if id(value) not in summed:
            local = get(value)
            out = Value(f"{value.name}.all_reduce", local.type)
            nodes.append(Node("all_reduce", (local,), (out,), {"op": "sum"}))
            summed[id(value)] = out
        return summed[id(value)]

    for index, node in enumerate(fn.nodes):
        new_inputs = [get(v) for v in node.inputs]
        for i in analysis.reduce.get(index, ()):
            new_inputs[i] = reduced(node.inputs[i])
        attrs = {**node.attrs, **analysis.attrs.get(index, {})}
        types = get_op(node.op).infer([v.type for v in new_inputs], attrs)
        outs = tuple(o if o.type == t else Value(o.name, t, o.kind)
                     for o, t in zip(node.outputs, types))
        for old, new in zip(node.outputs, outs):
            mapped[id(old)] = new
        nodes.append(Node(node.op, tuple(new_inputs), outs, attrs))
    outputs = [reduced(v) if i in analysis.reduce_outputs else get(v)
               for i, v in enumerate(fn.outputs)]
    return fn.replace(inputs=tuple(inputs), nodes=tuple(nodes), outputs=tuple(outputs))


def _merge_specs(analyses: list[_Analysis]) -> dict[str, ShardSpec]:
    specs: dict[str, ShardSpec] = {}
    for analysis in analyses:
        for name, spec in analysis.specs.items():
            if specs.setdefault(name, spec) != spec:
                raise _fail(f"parameter {name} is split differently by two entry functions")
    return specs


@dataclass(frozen=True)
class ShardModule(Pass):
    """Rewrites the module into the program each of `shards` ranks runs.

    Requires: quantized weights already stored as q_weight/q_scale (quantize_weights ran),
    attention not fused yet or fused into qkv_attention. Guarantees: every parameter has its
    local shape and a `shard` annotation (ShardSpec); the KV cache holds the local heads; an
    `all_reduce` follows each row-parallel product (or sum of such products) where the whole
    value is needed; the module attribute `tensor_parallel_shards` is set.
    """

    name: ClassVar[str] = "shard"
    shards: int = 1

    def run(self, module: Module) -> Module:
        if self.shards < 1:
            raise _fail(f"tensor_parallel_shards={self.shards} must be >= 1")
        if self.shards == 1:
            return module
        analyses = [analyse(fn, self.shards) for fn in module.functions]
        for analysis in analyses:
            if analysis.errors:
                raise _fail(analysis.errors[0])
        specs = _merge_specs(analyses)
        params = {}
        for p in module.params:
            spec = specs.get(p.name, ShardSpec(self.shards))
            shape = spec.local_shape(tuple(p.type.shape))
            params[p.name] = Param(p.name, TensorType(p.type.dtype, shape),
                                   {**p.annotations, "shard": spec})
        functions = [rewrite(fn, a, params, self.shards)
                     for fn, a in zip(module.functions, analyses)]
        out = module.with_params(params.values())
        for fn in functions:
            out = out.with_function(fn)
        return out.with_attrs(tensor_parallel_shards=self.shards)


def shard_params(module: Module, arrays: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank `rank`'s parameter arrays from the unsharded ones, by the module's shard specs."""
    out = {}
    for p in module.params:
        spec = p.annotations.get("shard")
        if p.name not in arrays:
            raise _fail(f"parameter {p.name} is missing from the unsharded weights")
        out[p.name] = arrays[p.name] if spec is None else spec.take(arrays[p.name], rank)
    return out
