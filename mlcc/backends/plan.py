"""Device-neutral lowering plan: which kernels an entry function runs, on which buffers.

The passes leave each entry function as an ordered list of fused ops with a memory plan. This
module turns it into an `EntryPlan`: the entry's arguments in calling order (tokens, sequence
info, the KV page pool, the parameters, the output, the workspace), a buffer for every value
(an argument, a workspace view, or an alias through a reshape), and one `KernelCall` per node.
A `KernelSpec` is the static description of a kernel (op, shapes, dtypes, attributes); equal
specs share one compiled kernel, so the 32 layers of a 7B model use one kernel per distinct shape.

Entry calling convention (all entries):
    tokens      int32[n]                      n = seq_len (prefill) or 1 (decode)
    seq_info    int32[2]                      [positions already cached, 0]
                int32[batch]                  (batch_decode) positions cached per sequence
    page_table  int32[pages_per_seq]          physical page of each logical page
                int32[batch, pages_per_seq]   (batch_decode) one row per sequence
    kv_pool     kv_dtype[layers, pages, 2, kv_heads, page_size, head_dim]
                (attention kernels get the view of their layer: [pages, 2, ...])
    params...   in module order (the order of the params folder's records)
    logits      float32[vocab]                written by the entry
    workspace   uint8[workspace_bytes]        scratch for every intermediate
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlcc import ir
from mlcc.ir.types import Dim, Sym, TensorType
from mlcc.passes.layout import nbytes_upper

SUPPORTED_OPS = (
    "embedding", "q_embedding", "linear", "q_linear", "rms_norm", "layer_norm", "add_rms_norm",
    "add_layer_norm", "add", "mul", "scale", "silu", "gelu", "silu_mul", "cast",
    "qkv_attention", "last_row", "last_logits", "gelu_mul", "scale_in_dtype", "moe_route",
    "moe_combine", "all_reduce",
    "moe_dispatch", "moe_linear", "q_moe_linear", "moe_reduce",
)
VIEW_OPS = ("reshape",)
# Collectives get no kernel: the entry calls a function registered by the runtime that runs the
# shards (mlcc.runtime_check.tensor_parallel) as `name(src_ptr, dst_ptr, count, dtype)`; dst
# receives the sum of src over all ranks, on the device's current stream.
CCL_FUNCTIONS = {"all_reduce": "mlcc.ccl.all_reduce"}
# Attention kernels read positions from seq_info themselves; `positions` gets a kernel only when
# another op reads it (learned position embeddings: GPT-2, GPT-BigCode).
NO_KERNEL_OPS = ("positions",)


@dataclass(frozen=True)
class BufferRef:
    """A tensor the entry passes to a kernel."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    source: str  # "arg" | "workspace"
    arg: str = ""  # argument name (source "arg") or "" for workspace views
    offset: int = 0  # byte offset in the workspace
    index: tuple[int, ...] = ()  # for a view of an argument: where the view starts


@dataclass(frozen=True)
class KernelSpec:
    op: str
    inputs: tuple[tuple[tuple[Dim, ...], str], ...]  # (shape, dtype) of each tensor input
    outputs: tuple[tuple[tuple[Dim, ...], str], ...]
    attrs: tuple[tuple[str, Any], ...]
    kv: tuple[tuple[str, Any], ...] = ()  # KV layout, for attention

    def attr(self, name: str) -> Any:
        return dict(self.attrs)[name]


@dataclass
class KernelCall:
    spec: KernelSpec
    buffers: list[BufferRef]  # inputs then outputs, plus seq_info/page_table/kv_pool for attention


@dataclass
class EntryPlan:
    name: str
    args: list[BufferRef]
    calls: list[KernelCall] = field(default_factory=list)
    workspace_bytes: int = 0
    symbols: tuple[str, ...] = ()
    bounds: tuple[tuple[str, int], ...] = ()  # upper bound of each symbol (the memory plan's)


class LoweringError(Exception):
    pass


PairFusion = Callable[[KernelCall, KernelCall, list[KernelCall]], KernelCall | None]


def workspace_range(ref: BufferRef, bounds: dict[str, int]) -> tuple[int, int] | None:
    """[start, end) bytes of a workspace view at the symbols' upper bounds (None for arguments;
    a symbol without a bound counts as unbounded)."""
    if ref.source != "workspace":
        return None
    unbounded = defaultdict(lambda: 1 << 62, bounds)
    return ref.offset, ref.offset + nbytes_upper(TensorType(ref.dtype, ref.shape), unbounded)


def writes_over_inputs(call: KernelCall, bounds: dict[str, int]) -> bool:
    """Whether an output of `call` shares workspace bytes with one of its inputs: one kernel
    then reads what its other threads may already have overwritten."""
    n_in = len(call.spec.inputs)
    spans = [workspace_range(b, bounds) for b in call.buffers[:n_in + len(call.spec.outputs)]]
    ins, outs = [s for s in spans[:n_in] if s], [s for s in spans[n_in:] if s]
    return any(a < d and c < b for a, b in outs for c, d in ins)


def fuse_adjacent(plan: EntryPlan, fuse: PairFusion) -> EntryPlan:
    """The plan with each pair of neighbouring calls that `fuse(first, second, later calls)`
    turns into one call replaced by it (a call takes part in one fusion at most). A fused call
    whose output the memory plan put over one of its inputs is not taken: the two values were
    planned for two kernels, one after the other."""
    calls = list(plan.calls)
    bounds = dict(plan.bounds)
    out: list[KernelCall] = []
    i = 0
    while i < len(calls):
        fused = fuse(calls[i], calls[i + 1], calls[i + 2:]) if i + 1 < len(calls) else None
        if fused is not None and writes_over_inputs(fused, bounds):
            fused = None
        if fused is not None:
            out.append(fused)
            i += 2
            continue
        out.append(calls[i])
        i += 1
    return EntryPlan(plan.name, plan.args, out, plan.workspace_bytes, plan.symbols, plan.bounds)


def _shape_dtype(value: ir.Value) -> tuple[tuple[Dim, ...], str]:
    return tuple(value.type.shape), value.type.dtype


def entry_args(fn: ir.Function, module: ir.Module) -> list[BufferRef]:
    layout = dict(module.attrs["kv_layout"])
    tokens = fn.inputs[0]
    pool_shape = (layout["layers"], layout["pages"], 2, layout["kv_heads"], layout["page_size"],
                  layout["head_dim"])
    if fn.attrs.get("batched_kv"):
        batch = tokens.type.shape[0]
        seq_info = BufferRef("seq_info", (batch,), "int32", "arg", "seq_info")
        table = BufferRef("page_table", (batch, layout["pages_per_seq"]), "int32", "arg",
                          "page_table")
    else:
        seq_info = BufferRef("seq_info", (2,), "int32", "arg", "seq_info")
        table = BufferRef("page_table", (layout["pages_per_seq"],), "int32", "arg", "page_table")
    args = [
        BufferRef("tokens", tuple(tokens.type.shape), "int32", "arg", "tokens"),
        seq_info,
        table,
        BufferRef("kv_pool", pool_shape, layout["dtype"], "arg", "kv_pool"),
    ]
    for p in module.params:
        args.append(BufferRef(p.name, tuple(p.type.shape), p.type.dtype, "arg", p.name))
    (out,) = fn.outputs
    args.append(BufferRef("logits", tuple(out.type.shape), out.type.dtype, "arg", "logits"))
    # The runtime passes one workspace for all entries, as large as the largest needs.
    args.append(BufferRef("workspace", (Sym("workspace_bytes"),), "uint8", "arg", "workspace"))
    return args


def plan_entry(fn: ir.Function, module: ir.Module) -> EntryPlan:
    """Assign buffers and kernel calls for one entry function (after the pass pipeline)."""
    args = entry_args(fn, module)
    by_arg = {a.arg: a for a in args}
    layout = tuple(sorted(dict(module.attrs["kv_layout"]).items()))
    offsets = dict(fn.attrs["memory_plan"])
    buffers: dict[int, BufferRef] = {id(fn.inputs[0]): by_arg["tokens"]}
    out_value = fn.outputs[0]
    buffers[id(out_value)] = by_arg["logits"]
    plan = EntryPlan(fn.name, args, workspace_bytes=int(fn.attrs.get("workspace_bytes", 0)),
                     symbols=tuple(sorted({s.name for s in fn.symbols} | {"workspace_bytes"})),
                     bounds=tuple(sorted(dict(module.attrs.get("symbol_bounds", ())).items())))

    def buffer_of(value: ir.Value) -> BufferRef:
        if value.kind == "param":
            return by_arg[value.name]
        if id(value) not in buffers:
            if value.name not in offsets:
                raise LoweringError(f"{fn.name}: value %{value.name} has no memory assignment")
            shape, dtype = _shape_dtype(value)
            buffers[id(value)] = BufferRef(value.name, shape, dtype, "workspace", "",
                                           offsets[value.name])
        return buffers[id(value)]

    users = fn.users()
    for node in fn.nodes:
        if node.op in NO_KERNEL_OPS:
            if any(u.op != "qkv_attention" for u in users.get(id(node.output), [])):
                plan.calls.append(_positions_call(node, buffer_of(node.output),
                                                  by_arg["seq_info"]))
            continue
        if node.op in VIEW_OPS:
            src = buffer_of(node.inputs[0])
            shape, dtype = _shape_dtype(node.output)
            buffers[id(node.output)] = BufferRef(node.output.name, shape, dtype, src.source,
                                                 src.arg, src.offset)
            continue
        if node.op not in SUPPORTED_OPS:
            raise LoweringError(f"{fn.name}: op {node.op!r} (defining {node.outputs[0].ref}) has "
                                f"no kernel; supported: {', '.join(SUPPORTED_OPS)}")
        tensor_inputs = [v for v in node.inputs if isinstance(v.type, TensorType)]
        if node.op == "qkv_attention":
            tensor_inputs = [node.inputs[0]]  # positions come from seq_info
        attrs = dict(node.attrs)
        layer = attrs.pop("layer", None)  # attention kernels are shared by all layers
        spec = KernelSpec(
            node.op,
            tuple(_shape_dtype(v) for v in tensor_inputs),
            tuple(_shape_dtype(v) for v in node.outputs),
            tuple(sorted(attrs.items())),
            layout if node.op == "qkv_attention" else (),
        )
        refs = [buffer_of(v) for v in tensor_inputs] + [buffer_of(v) for v in node.outputs]
        if node.op == "qkv_attention":
            pool = by_arg["kv_pool"]
            layer_view = BufferRef(f"kv_pool.{layer}", pool.shape[1:], pool.dtype, "arg",
                                   "kv_pool", 0, (layer,) + (0,) * (len(pool.shape) - 1))
            refs += [by_arg["seq_info"], by_arg["page_table"], layer_view]
        plan.calls.append(KernelCall(spec, refs))
    return plan


def _positions_call(node: ir.Node, out: BufferRef, seq_info: BufferRef) -> KernelCall:
    """positions(cache): y[i] = seq_info[0] + i, or seq_info[i] in a batched entry."""
    attrs = tuple(sorted(node.attrs.items()))
    spec = KernelSpec("positions", (), (_shape_dtype(node.output),), attrs)
    return KernelCall(spec, [out, seq_info])


def symbolic_dims(spec: KernelSpec) -> set[str]:
    names = set()
    for shape, _ in spec.inputs + spec.outputs:
        names.update(d.name for d in shape if isinstance(d, Sym))
    return names


def with_tensor_parallel(module: ir.Module, metadata: dict) -> dict:
    """`metadata` plus, for a sharded module, how to slice each unsharded parameter per rank
    (`tensor_parallel`: shards, the collective functions the entries call, ShardSpec JSON)."""
    shards = int(module.attrs.get("tensor_parallel_shards", 1))
    if shards <= 1:
        return metadata
    specs = {p.name: p.annotations["shard"].to_json() for p in module.params
             if "shard" in p.annotations}
    return {**metadata, "tensor_parallel": {"shards": shards, "ccl": dict(CCL_FUNCTIONS),
                                            "params": specs}}
