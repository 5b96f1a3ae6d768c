"""KV-cache layout, prefill chunking and memory planning: global decisions recorded on the module.

- KVCacheLayout: the cache becomes a page pool per layer plus a page table per sequence (pages
  of 16 positions). Without a sliding window the pool covers the context window. With a window
  it is a ring: sink positions keep their slots, the rest wrap around a capacity large enough for
  the window plus one prefill chunk, so a chunk never overwrites keys it still needs.
- PrefillChunking: prefill handles at most `prefill_chunk_size` tokens per call; longer prompts
  are fed as several calls by the runtime. This bounds the `seq_len` symbol.
- PlanMemory: every intermediate of an entry function gets a byte offset in one workspace sized
  from the symbols' upper bounds; values whose lifetimes do not overlap share bytes, and a
  reshape shares its input's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mlcc.ir import Function, KVCacheType, Module, Sym, TensorType
from mlcc.ir.types import numpy_dtype
from mlcc.passes.base import Pass, map_functions

PAGE_SIZE = 16
ALIGN = 64
VIEW_OPS = ("reshape",)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def cache_type_of(module: Module) -> KVCacheType | None:
    for fn in module.functions:
        for value in fn.inputs:
            if isinstance(value.type, KVCacheType):
                return value.type
    return None


@dataclass(frozen=True)
class PrefillChunking(Pass):
    """Bounds `seq_len` by the prefill chunk size; records it for the runtime and the planner."""

    name: ClassVar[str] = "prefill_chunking"
    prefill_chunk_size: int = 2048

    def run(self, module: Module) -> Module:
        if self.prefill_chunk_size <= 0:
            raise ValueError(f"[compile] prefill_chunk_size must be > 0, got "
                             f"{self.prefill_chunk_size}")
        bounds = dict(module.attrs.get("symbol_bounds", ()))
        bounds["seq_len"] = self.prefill_chunk_size
        bounds["batch"] = int(module.attrs.get("max_batch_size", 1))
        return module.with_attrs(symbol_bounds=tuple(sorted(bounds.items())),
                                 prefill_chunk_size=self.prefill_chunk_size)


@dataclass(frozen=True)
class KVCacheLayout(Pass):
    """Chooses the paged layout of the KV cache and records it as the module's `kv_layout`.

    Requires: prefill_chunking ran (the ring of a sliding window must hold one chunk).
    Guarantees: `kv_layout` holds page_size, pages (per layer, for all sequences),
    pages_per_seq, max_sequences (max_batch_size), capacity (positions per sequence),
    ring (bool), window, sinks, dtype, kv_heads, head_dim, layers, bytes_per_token.
    """

    name: ClassVar[str] = "kv_cache_layout"
    page_size: int = PAGE_SIZE

    def run(self, module: Module) -> Module:
        cache = cache_type_of(module)
        if cache is None:
            return module
        chunk = int(module.attrs.get("prefill_chunk_size", cache.capacity))
        ring = cache.sliding_window > 0
        if ring:
            capacity = _round_up(cache.sink_size + cache.sliding_window + chunk, self.page_size)
        else:
            capacity = _round_up(cache.capacity, self.page_size)
        itemsize = np.dtype(numpy_dtype(cache.dtype)).itemsize
        sequences = int(module.attrs.get("max_batch_size", 1))
        pages_per_seq = capacity // self.page_size
        layout = {
            "page_size": self.page_size, "pages": pages_per_seq * sequences,
            "pages_per_seq": pages_per_seq, "max_sequences": sequences,
            "capacity": capacity, "ring": ring, "window": cache.sliding_window,
            "sinks": cache.sink_size, "dtype": cache.dtype, "kv_heads": cache.num_kv_heads,
            "head_dim": cache.head_dim, "layers": cache.num_layers,
            "max_positions": -1 if ring else cache.capacity,
            "bytes_per_token": 2 * cache.num_layers * cache.num_kv_heads * cache.head_dim
            * itemsize,
        }
        return module.with_attrs(kv_layout=tuple(layout.items()))


def nbytes_upper(t: TensorType, bounds: dict[str, int]) -> int:
    count = 1
    for d in t.shape:
        count *= bounds[d.name] if isinstance(d, Sym) else d
    return count * np.dtype(numpy_dtype(t.dtype)).itemsize


# (producer, consumer) ops that a backend may run as one kernel (the CUDA backend's GLU
# epilogue, mlcc.backends.cuda.glu, and its GEMV prologues, mlcc.backends.cuda.fusion): the
# producer's inputs are planned as alive until the consumer, so the pair's output never takes
# their bytes. Planned apart, the consumer's output may reuse the producer's input, which the
# fused kernel still reads while it writes.
FUSABLE_PAIRS = frozenset({("linear", "silu_mul"), ("q_linear", "silu_mul"),
                           ("rms_norm", "q_linear"), ("add_rms_norm", "q_linear"),
                           ("silu_mul", "q_linear")})
# The folded norms of mlcc.backends.cuda.norm_fold (decode GEMVs: rows known at compile time)
# keep partial sums in the bytes of the GEMV result an add_rms_norm reads until the call after
# the norm has run, the fused GLU included, and read the norm's sum there. Where the rows are
# static, an add_rms_norm's inputs and outputs are therefore alive one pair further when its
# consumer heads a pair too, and (q_linear, add_rms_norm) keeps that GEMV's input apart from
# the sum it now writes. (Prefill keeps its plan: there these would only cost workspace.)
STATIC_PAIRS = frozenset({("q_linear", "add_rms_norm")})


def _pair_end(fn: Function) -> dict[int, int]:
    """Index of the consumer node for every producer node of a FUSABLE_PAIRS pair: the
    consumer is the only reader of the producer's (first) output, through views if any."""
    users = fn.users()
    index = {id(node): i for i, node in enumerate(fn.nodes)}
    ends = {}
    for i, node in enumerate(fn.nodes):
        if not any(node.op == a for a, _ in FUSABLE_PAIRS | STATIC_PAIRS):
            continue
        value = node.outputs[0]
        readers = users.get(id(value), [])
        while len(readers) == 1 and readers[0].op in VIEW_OPS:
            value = readers[0].output
            readers = users.get(id(value), [])
        pairs = FUSABLE_PAIRS | (STATIC_PAIRS if _static(value) else frozenset())
        if len(readers) == 1 and (node.op, readers[0].op) in pairs:
            ends[i] = index[id(readers[0])]
    for i in sorted(ends):
        if _folds(fn.nodes[i]):
            ends[i] = ends.get(ends[i], ends[i])
    return ends


def _static(value) -> bool:
    return isinstance(value.type, TensorType) and not any(isinstance(d, Sym)
                                                          for d in value.type.shape)


def _folds(node) -> bool:
    """An add_rms_norm that norm_fold may split between the GEMVs around it."""
    return node.op == "add_rms_norm" and _static(node.outputs[0])


def plan_function(fn: Function, bounds: dict[str, int]) -> Function:
    """Assign workspace offsets to node outputs (not function outputs, which the caller owns)."""
    index_of_def: dict[int, int] = {}
    last_use: dict[int, int] = {}
    root: dict[int, int] = {}
    values = {}
    pair_end = _pair_end(fn)
    for i, node in enumerate(fn.nodes):
        for v in node.inputs:
            last_use[id(v)] = max(last_use.get(id(v), -1), pair_end.get(i, i))
        for v in node.outputs:
            index_of_def[id(v)] = i
            values[id(v)] = v
            root[id(v)] = id(v)
            if _folds(node) and i in pair_end:  # the sum, read by a folded consumer
                last_use[id(v)] = max(last_use.get(id(v), -1), pair_end[i])
        if node.op in VIEW_OPS and id(node.inputs[0]) in root:
            root[id(node.output)] = root[id(node.inputs[0])]
    returned = {id(v) for v in fn.outputs}
    groups: dict[int, list[int]] = {}
    for vid, r in root.items():
        groups.setdefault(r, []).append(vid)
    intervals = []
    for r, members in groups.items():
        if any(m in returned for m in members) or not isinstance(values[r].type, TensorType):
            continue
        start = min(index_of_def[m] for m in members)
        end = max(last_use.get(m, index_of_def[m]) for m in members)
        intervals.append((nbytes_upper(values[r].type, bounds), start, end, r))
    placed: list[tuple[int, int, int, int]] = []  # offset, size, start, end
    offsets: dict[int, int] = {}
    for size, start, end, r in sorted(intervals, key=lambda t: (-t[0], t[1])):
        offset = 0
        for o, s, a, b in sorted(placed):
            overlaps_time = not (end < a or b < start)
            if overlaps_time and offset < o + s and o < offset + size:
                offset = _round_up(o + s, ALIGN)
        placed.append((offset, size, start, end))
        offsets[r] = offset
    plan = tuple((values[vid].name, offsets[root[vid]]) for vid in root if root[vid] in offsets)
    workspace = max((o + s for o, s, _, _ in placed), default=0)
    return fn.replace(attrs={**fn.attrs, "memory_plan": plan,
                             "workspace_bytes": _round_up(workspace, ALIGN)})


@dataclass(frozen=True)
class PlanMemory(Pass):
    """Gives every intermediate a workspace offset; records `workspace_bytes` per function.

    Requires: symbol bounds for every symbol of the entry functions (prefill_chunking).
    Guarantees: values alive at the same time never share bytes; offsets are 64-byte aligned;
    the inputs of a FUSABLE_PAIRS producer count as alive until its consumer, so a backend may
    run the pair as one kernel.
    """

    name: ClassVar[str] = "plan_memory"

    def run(self, module: Module) -> Module:
        bounds = dict(module.attrs.get("symbol_bounds", ()))
        for fn in module.functions:
            missing = sorted(s.name for s in fn.symbols if s.name not in bounds)
            if missing:
                raise ValueError(f"[compile] no upper bound for symbols {missing} of "
                                 f"{fn.name!r}; run prefill_chunking first")
        return map_functions(module, lambda fn: plan_function(fn, bounds))
