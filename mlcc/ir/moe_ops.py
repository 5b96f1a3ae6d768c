"""Sparse mixture-of-experts ops: each expert computes only the rows routed to it.

The router's dense weights f32[n, experts] (`moe_route`: non-zero for a row's chosen experts)
become a list of (row, expert) pairs, the *slots*, ordered by expert and then by row:

    slot_rows, expert_offsets, row_slots = moe_dispatch(weights, top_k=k)
        slot_rows       i32[n, k]          flat index p = row * k + j: the source row of slot p
                                           (-1 past the last used slot)
        expert_offsets  i32[experts + 1]   expert e owns slots offsets[e] .. offsets[e+1] - 1
        row_slots       i32[n, k]          the slots of row i, its experts in ascending order
                                           (-1 where the row has fewer than k non-zero weights)
    h = moe_linear(x, slot_rows, expert_offsets, w_0, ..., w_{E-1}, gather=True)  # [n, k, N]
    a = silu_mul(h)                                                                # [n, k, N/2]
    d = moe_linear(a, slot_rows, expert_offsets, v_0, ..., v_{E-1}, gather=False)  # [n, k, H]
    y = moe_reduce(d, weights, row_slots)                                          # [n, H]

Slot tensors are shaped [n, k, features] and indexed by the flat slot p, so a memory planner
bounds them by the symbol `n` like any activation. `q_moe_linear` is `moe_linear` over
group-quantized experts (q_weight, q_scale per expert, as `q_linear` reads them). Rounding is the
dense formulation's (linear, silu_mul, linear per expert, then `moe_combine`): every slot result
is rounded to the activation dtype, and `moe_reduce` sums weight * result in float32 over the
row's experts in ascending order, so the sparse chain equals the dense one.
"""

from __future__ import annotations

import numpy as np

from mlcc.ir.ops import need, need_float, out, tensor
from mlcc.ir.quant_ops import QUANT_ATTRS, _check_quant_operands, dequantize_group
from mlcc.ir.registry import AttrSpec, OpDef, as_f32, register
from mlcc.ir.types import TensorType

GATHER = AttrSpec("gather", (bool,), doc="x is [n, K] read through slot_rows (else [n, k, K])")


# --- moe_dispatch ---------------------------------------------------------------------------


def _dispatch_infer(types, attrs):
    weights = tensor(types, 0, "router_weights")
    need(weights.dtype == "float32" and weights.rank == 2 and isinstance(weights.shape[1], int),
         f"router_weights must be f32[n, experts] with a static expert count, got {weights}")
    experts, k = weights.shape[1], attrs["top_k"]
    need(0 < k <= experts, f"top_k must be in [1, {experts}], got {k}")
    n = weights.shape[0]
    return (TensorType("int32", (n, k)), TensorType("int32", (experts + 1,)),
            TensorType("int32", (n, k)))


def _dispatch_ref(ctx, inputs, attrs):
    chosen = np.asarray(inputs[0]) != 0  # (n, experts)
    n, k = chosen.shape[0], attrs["top_k"]
    per_row = chosen.sum(axis=1)
    if per_row.size and per_row.max() > k:
        row = int(np.argmax(per_row))
        raise ValueError(f"row {row} has {per_row[row]} non-zero router weights, more than "
                         f"top_k={k}")
    counts = chosen.sum(axis=0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slot_rows = np.full(n * k, -1, np.int32)
    slot_rows[: offsets[-1]] = np.concatenate(
        [np.flatnonzero(chosen[:, e]) for e in range(chosen.shape[1])] + [np.zeros(0, np.int64)])
    slot = offsets[:-1][None, :] + np.cumsum(chosen, axis=0) - 1  # slot of (row, expert)
    rank = np.cumsum(chosen, axis=1) - 1  # position of the expert among the row's experts
    row_slots = np.full((n, k), -1, np.int32)
    rows, experts = np.nonzero(chosen)
    row_slots[rows, rank[rows, experts]] = slot[rows, experts]
    return slot_rows.reshape(n, k), offsets, row_slots


register(OpDef("moe_dispatch", (AttrSpec("top_k", (int,)),), (1, 1), _dispatch_infer,
               _dispatch_ref,
               doc="Slots of the (row, expert) pairs with non-zero router weight, ordered by "
                   "expert then row: (slot_rows, expert_offsets, row_slots)."))


# --- moe_linear / q_moe_linear --------------------------------------------------------------


def _slot_operands(types, attrs, experts: int) -> tuple[TensorType, int]:
    """Checks x, slot_rows and expert_offsets; returns (x, K)."""
    x, slot_rows = tensor(types, 0, "x"), tensor(types, 1, "slot_rows")
    offsets = tensor(types, 2, "expert_offsets")
    need_float(x, "x")
    need(slot_rows.dtype == "int32" and slot_rows.rank == 2,
         f"slot_rows must be i32[n, top_k], got {slot_rows}")
    need(offsets.dtype == "int32" and offsets.shape == (experts + 1,),
         f"expert_offsets must be i32[{experts + 1}] for {experts} experts, got {offsets}")
    n, k = slot_rows.shape
    if attrs["gather"]:
        need(x.rank == 2 and x.shape[0] == n, f"x must be [{n}, K] (rows of slot_rows), got {x}")
    else:
        need(x.rank == 3 and x.shape[:2] == (n, k), f"x must be [{n}, {k}, K] (slots), got {x}")
    return x, x.shape[-1]


def _moe_linear_infer(types, attrs):
    experts = len(types) - 3
    need(experts >= 1, f"moe_linear needs at least one expert weight, got {experts}")
    x, k_in = _slot_operands(types, attrs, experts)
    w0 = tensor(types, 3, "w_0")
    for e in range(experts):
        w = tensor(types, 3 + e, f"w_{e}")
        need(w == w0 and w.rank == 2, f"expert weights must all be [N, K] like {w0}; "
                                      f"w_{e} is {w}")
    need(w0.dtype == x.dtype and w0.shape[1] == k_in,
         f"expert weights {w0} must be [N, {k_in}] of x's dtype ({x})")
    return (TensorType(x.dtype, types[1].shape + (w0.shape[0],)),)


def _q_moe_linear_infer(types, attrs):
    pairs, odd = divmod(len(types) - 3, 2)
    need(pairs >= 1 and not odd,
         f"q_moe_linear needs (q_weight, q_scale) per expert after x, slot_rows and "
         f"expert_offsets, got {len(types) - 3} weight inputs")
    x, k_in = _slot_operands(types, attrs, pairs)
    qw0, qs0 = tensor(types, 3, "q_weight_0"), tensor(types, 4, "q_scale_0")
    n_out, k = _check_quant_operands(qw0, qs0, attrs)
    for e in range(pairs):
        qw, qs = tensor(types, 3 + 2 * e, f"q_weight_{e}"), tensor(types, 4 + 2 * e, f"q_scale_{e}")
        need(qw == qw0 and qs == qs0, f"expert {e}: q_weight {qw} / q_scale {qs} must match "
                                      f"expert 0's {qw0} / {qs0}")
    need(k == k_in, f"x {x} last dim must equal in_features {k}")
    return (TensorType(x.dtype, types[1].shape + (n_out,)),)


def _grouped_matmul(x: np.ndarray, slot_rows: np.ndarray, offsets: np.ndarray, gather: bool,
                    weights: list, n_out: int) -> np.ndarray:
    """float32 [n * k, N]: each expert's slots times its weight (a callable giving f32 [N, K])."""
    n, k = slot_rows.shape
    flat_rows = slot_rows.reshape(-1)
    src = as_f32(x) if gather else as_f32(x).reshape(n * k, x.shape[-1])
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > n * k:
        raise ValueError(f"expert_offsets {offsets.tolist()} must rise from 0 to at most "
                         f"{n * k} slots")
    result = np.zeros((n * k, n_out), np.float32)
    for e, weight in enumerate(weights):
        slots = np.arange(offsets[e], offsets[e + 1])
        if not slots.size:
            continue
        rows = flat_rows[slots] if gather else slots
        if rows.min() < 0 or rows.max() >= src.shape[0]:
            raise ValueError(f"expert {e}: slot rows {rows.tolist()} out of range")
        result[slots] = src[rows] @ weight().T
    return result


def _moe_linear_ref(ctx, inputs, attrs):
    x, slot_rows, offsets = inputs[:3]
    n_out = inputs[3].shape[0]
    weights = [lambda w=w: as_f32(w) for w in inputs[3:]]
    y = _grouped_matmul(x, slot_rows, offsets, attrs["gather"], weights, n_out)
    return out([y.reshape(slot_rows.shape + (n_out,))], [x.dtype.name])


def _q_moe_linear_ref(ctx, inputs, attrs):
    x, slot_rows, offsets = inputs[:3]
    n_out = inputs[3].shape[0]

    def dequantized(qw, qs):
        w = dequantize_group(qw, qs, attrs["bits"], attrs["group_size"], attrs["in_features"])
        return w.astype(qs.dtype).astype(np.float32)  # rounded to the scale dtype, as q_linear

    weights = [lambda qw=qw, qs=qs: dequantized(qw, qs)
               for qw, qs in zip(inputs[3::2], inputs[4::2])]
    y = _grouped_matmul(x, slot_rows, offsets, attrs["gather"], weights, n_out)
    return out([y.reshape(slot_rows.shape + (n_out,))], [x.dtype.name])


register(OpDef("moe_linear", (GATHER,), (4, None), _moe_linear_infer, _moe_linear_ref,
               doc="Grouped matmul over slots: slot p of expert e is x[slot_rows[p]] (gather) "
                   "or x[p] times w_e.T; unused slots are 0."))
register(OpDef("q_moe_linear", QUANT_ATTRS + (GATHER,), (5, None), _q_moe_linear_infer,
               _q_moe_linear_ref,
               doc="moe_linear over group-quantized experts (q_weight_e, q_scale_e pairs), "
                   "dequantization fused."))


# --- moe_reduce -----------------------------------------------------------------------------


def _reduce_infer(types, attrs):
    values, weights = tensor(types, 0, "slot_values"), tensor(types, 1, "router_weights")
    row_slots = tensor(types, 2, "row_slots")
    need_float(values, "slot_values")
    need(values.rank == 3, f"slot_values must be [n, top_k, hidden], got {values}")
    n, k = values.shape[:2]
    need(weights.dtype == "float32" and weights.rank == 2 and weights.shape[0] == n,
         f"router_weights must be f32[{n}, experts], got {weights}")
    need(row_slots.dtype == "int32" and row_slots.shape == (n, k),
         f"row_slots must be i32[{n}, {k}], got {row_slots}")
    return (TensorType(values.dtype, (n, values.shape[2])),)


def _reduce_ref(ctx, inputs, attrs):
    values, weights, row_slots = inputs
    n, k, hidden = values.shape
    flat = as_f32(values).reshape(n * k, hidden)
    chosen = weights != 0
    rank = np.cumsum(chosen, axis=1) - 1
    total = np.zeros((n, hidden), np.float32)
    for e in range(weights.shape[1]):  # ascending experts, as moe_combine adds them
        rows = np.flatnonzero(chosen[:, e])
        if not rows.size:
            continue
        if rank[rows, e].max() >= k:
            raise ValueError(f"expert {e}: a row has more than top_k={k} non-zero weights")
        slots = row_slots[rows, rank[rows, e]]
        if slots.min() < 0 or slots.max() >= n * k:
            raise ValueError(f"expert {e}: row_slots {slots.tolist()} out of range")
        total[rows] += weights[rows, e:e + 1] * flat[slots]
    return out([total], [values.dtype.name])


register(OpDef("moe_reduce", (), (3, 3), _reduce_infer, _reduce_ref,
               doc="y[i] = sum over row i's experts e (ascending, float32) of "
                   "weights[i, e] * slot_values[slot of (i, e)]."))

