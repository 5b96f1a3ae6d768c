"""Tensor parallelism in the IR: shard specs of parameters, the all_reduce op, lockstep execution.

A model split over N shards runs N programs of the same node structure, one per rank, each on
its own slice of the weights. `ShardSpec` says how a parameter is sliced for a rank;
`all_reduce` sums a tensor over the ranks, so its NumPy reference for one program alone is the
identity. `run_sharded` executes the N programs together node by node and performs the sums,
which makes it the oracle for the sharding pass and for compiled multi-shard libraries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlcc.ir.core import Module
from mlcc.ir.interpret import InterpretError, _bind_input, _check_param
from mlcc.ir.kv import KVCacheState
from mlcc.ir.ops import need, need_float, tensor
from mlcc.ir.registry import AttrSpec, EvalContext, OpDef, get_op, register
from mlcc.ir.types import KVCacheType

COLLECTIVE_OPS = ("all_reduce",)


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is divided among `shards` ranks.

    `axis` None: every rank holds the whole tensor; with `rank_zero_only`, rank 0 holds it and
    the others hold zeros (a bias added to a row-parallel product must be added once).
    Otherwise `axis` of the full tensor is a concatenation of `segments`, each `(size, parts)`:
    a segment is cut into `parts` equal chunks and rank r takes chunk `r * parts // shards` of
    every segment, concatenated in order. `parts == shards` gives every rank its own chunk;
    fewer parts share a chunk among ranks (key/value heads when there are fewer than shards).
    """

    shards: int
    axis: int | None = None
    segments: tuple[tuple[int, int], ...] = ()
    rank_zero_only: bool = False

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"a shard spec needs shards >= 1, got {self.shards}")
        for size, parts in self.segments:
            if parts < 1 or self.shards % parts:
                raise ValueError(f"segment ({size}, {parts}): {parts} parts do not divide "
                                 f"among {self.shards} shards")

    @property
    def replicated(self) -> bool:
        return self.axis is None

    def local_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape one rank holds of a full tensor of `shape`."""
        if self.axis is None:
            return tuple(shape)
        full = sum(size for size, _ in self.segments)
        if shape[self.axis] != full or any(size % parts for size, parts in self.segments):
            raise ValueError(f"axis {self.axis} of {tuple(shape)} does not split into the "
                             f"segments {self.segments}")
        local = list(shape)
        local[self.axis] = sum(size // parts for size, parts in self.segments)
        return tuple(local)

    def take(self, array: np.ndarray, rank: int) -> np.ndarray:
        """Rank `rank`'s slice of the full `array` (a new contiguous array)."""
        if not 0 <= rank < self.shards:
            raise ValueError(f"rank {rank} outside [0, {self.shards})")
        if self.axis is None:
            if self.rank_zero_only and rank:
                return np.zeros_like(array)
            return np.ascontiguousarray(array)
        self.local_shape(array.shape)  # checks the axis length
        pieces, start = [], 0
        for size, parts in self.segments:
            chunk = size // parts
            first = start + (rank * parts // self.shards) * chunk
            pieces.append(np.take(array, np.arange(first, first + chunk), axis=self.axis))
            start += size
        return np.ascontiguousarray(np.concatenate(pieces, axis=self.axis))

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "axis": self.axis,
                "segments": [list(s) for s in self.segments],
                "rank_zero_only": self.rank_zero_only}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardSpec:
        return cls(int(data["shards"]), data.get("axis"),
                   tuple((int(s), int(p)) for s, p in data.get("segments", ())),
                   bool(data.get("rank_zero_only", False)))


# --- the all_reduce op ----------------------------------------------------------------------


def _all_reduce_infer(types, attrs):
    x = tensor(types, 0, "x")
    need_float(x, "x")
    need(attrs["op"] == "sum", f"op must be 'sum', got {attrs['op']!r}")
    return (x,)


def _all_reduce_ref(ctx: EvalContext, inputs, attrs):
    # One program alone is a group of one rank: the sum over the group is the input itself.
    return (np.array(inputs[0], copy=True),)


register(OpDef(
    "all_reduce", (AttrSpec("op", (str,), "sum"),), (1, 1), _all_reduce_infer, _all_reduce_ref,
    doc="Elementwise sum of x over all tensor-parallel ranks; every rank gets the sum."))


def reduce_sum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The all_reduce result: sum in float32 in rank order, in the inputs' dtype."""
    total = np.zeros(arrays[0].shape, np.float32)
    for a in arrays:
        total += a.astype(np.float32)
    return total.astype(arrays[0].dtype)


# --- lockstep execution of N shard programs -------------------------------------------------


def _bind_rank(fn, args: Sequence[Any], bindings: dict[str, int]) -> tuple[dict, list]:
    env: dict[int, Any] = {}
    caches: list[KVCacheState] = []
    if len(args) != len(fn.inputs):
        raise InterpretError(f"function {fn.name!r} takes {len(fn.inputs)} inputs, got {len(args)}")
    for value, arg in zip(fn.inputs, args):
        if isinstance(value.type, KVCacheType):
            states = list(arg) if fn.attrs.get("batched_kv") else [arg]
            for state in states:
                if not isinstance(state, KVCacheState) or state.type != value.type:
                    raise InterpretError(f"input %{value.name}: expected a KVCacheState of "
                                         f"{value.type}")
            env[id(value)] = arg
            caches.extend(states)
        else:
            env[id(value)] = _bind_input(value.name, value.type, arg, bindings)
    return env, caches


def run_sharded(modules: Sequence[Module], fn_name: str, args: Sequence[Sequence[Any]],
                params: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, ...]]:
    """Run `fn_name` of every rank's module together; `args[r]`/`params[r]` are rank r's.

    The functions must have the same ops in the same order. Each node runs on every rank before
    the next; an `all_reduce` node gives every rank the sum of all ranks' inputs. Returns each
    rank's outputs.
    """
    fns = [m.function(fn_name) for m in modules]
    ops = [tuple(n.op for n in fn.nodes) for fn in fns]
    if any(o != ops[0] for o in ops):
        raise InterpretError(f"function {fn_name!r} differs between ranks; run_sharded needs "
                             "programs of the same node structure")
    ctxs, envs, caches = [], [], []
    for fn, rank_args in zip(fns, args):
        ctx = EvalContext({}, {})
        env, rank_caches = _bind_rank(fn, rank_args, ctx.bindings)
        ctxs.append(ctx)
        envs.append(env)
        caches.append(rank_caches)
    for index in range(len(ops[0])):
        nodes = [fn.nodes[index] for fn in fns]
        inputs = [[_check_param(fn, v.name, v.type, p) if v.kind == "param" else env[id(v)]
                   for v in node.inputs] for fn, node, env, p in zip(fns, nodes, envs, params)]
        if nodes[0].op == "all_reduce":
            total = reduce_sum([rank_inputs[0] for rank_inputs in inputs])
            results = [(total.copy(),) for _ in nodes]
        else:
            results = [get_op(node.op).reference(ctx, rank_inputs, node.attrs)
                       for node, ctx, rank_inputs in zip(nodes, ctxs, inputs)]
        for node, env, result in zip(nodes, envs, results):
            for value, array in zip(node.outputs, result):
                env[id(value)] = array
    for rank_caches in caches:
        for cache in rank_caches:
            cache.commit()
    return [tuple(env[id(v)] if v.kind != "param" else p[v.name] for v in fn.outputs)
            for fn, env, p in zip(fns, envs, params)]
