"""The sparse mixture-of-experts ops (mlcc/ir/moe_ops.py) through `ir.interpret` against PyTorch.

Each op is checked on its own against torch code that derives the same quantity another way
(dispatch from `torch.nonzero` of the transposed routing mask, grouped linears slot by slot with
the expert found by `torch.searchsorted`, the reduction by `index_add_`), and the whole chain
against a sparse MoE block written the way transformers' Mixtral writes it (softmax, top-k,
renormalize, then a loop over experts that gathers their rows). float32 must agree to 1e-5,
float16 to a few ulps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ir_op_references import SIZES, N, T, assert_close, op_module, rand, run, unpack_dequantize
from test_ir_ops_vs_torch import QUANT_CASES, quant_attrs, random_quantized

ROUTING = [(8, 2), (5, 3), (4, 1), (3, 3)]


def torch_route(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dense router weights as transformers' Mixtral computes them."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))


def torch_dispatch(weights: torch.Tensor, top_k: int):
    """Slots ordered by expert then row, from the transposed mask's non-zero entries."""
    n, experts = weights.shape
    pairs = torch.nonzero(weights.T != 0)  # (expert, row), expert-major, rows ascending
    counts = torch.bincount(pairs[:, 0], minlength=experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    slot_rows = torch.full((n * top_k,), -1, dtype=torch.long)
    slot_rows[: len(pairs)] = pairs[:, 1]
    row_slots = torch.full((n, top_k), -1, dtype=torch.long)
    for slot, (expert, row) in enumerate(pairs.tolist()):
        j = int((weights[row, :expert] != 0).sum())
        row_slots[row, j] = slot
    return slot_rows.reshape(n, top_k), offsets, row_slots


def random_weights(rng, n: int, experts: int, top_k: int) -> np.ndarray:
    return torch_route(T(rand(rng, (n, experts), "float32", 2.0)), top_k).numpy()


@pytest.mark.parametrize(("experts", "top_k"), ROUTING)
def test_moe_dispatch_lists_each_experts_rows(experts, top_k):
    module = op_module([("w", (N, experts), "float32")],
                       lambda b, w: b.emit_multi("moe_dispatch", w, top_k=top_k))
    rng = np.random.default_rng(60)
    for n in SIZES:
        weights = random_weights(rng, n, experts, top_k)
        if n > 1:
            weights[1] = 0.0  # a row whose weights all underflowed uses no slot
        slot_rows, offsets, row_slots = run(module, weights)
        expected = torch_dispatch(T(weights), top_k)
        for ours, ref in zip((slot_rows, offsets, row_slots), expected, strict=True):
            assert ours.dtype == np.int32
            np.testing.assert_array_equal(ours, ref.numpy())


def _slot_experts(offsets: np.ndarray, slots: int) -> torch.Tensor:
    return torch.searchsorted(T(offsets).long(), torch.arange(slots), right=True) - 1


def _check_grouped(ours, x, slot_rows, offsets, weight_of, gather: bool, dtype: str) -> None:
    n, k = slot_rows.shape
    expected = torch.zeros(ours.shape, dtype=torch.float32).reshape(n * k, -1)
    experts = _slot_experts(offsets, n * k)
    flat = T(x).float().reshape(-1, x.shape[-1])
    for p, row in enumerate(T(slot_rows).reshape(-1).tolist()):
        if row >= 0:
            source = flat[row] if gather else flat[p]
            expected[p] = F.linear(source, weight_of(int(experts[p])))
    assert_close(ours, expected.reshape(ours.shape).to(getattr(torch, dtype)), dtype)


def _routing(rng, n: int, experts: int, top_k: int):
    weights = random_weights(rng, n, experts, top_k)
    return [np.asarray(t.numpy(), np.int32) for t in torch_dispatch(T(weights), top_k)[:2]]


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (3, 3)])
def test_moe_linear_multiplies_each_slot_by_its_experts_weight(experts, top_k, dtype, gather):
    k_in, n_out = 24, 10
    params = [(f"w{e}", (n_out, k_in), dtype) for e in range(experts)]
    x_shape = (N, k_in) if gather else (N, top_k, k_in)
    module = op_module([("x", x_shape, dtype), ("rows", (N, top_k), "int32"),
                        ("offsets", (experts + 1,), "int32")],
                       lambda b, x, r, o, *w: b.emit("moe_linear", x, r, o, *w, gather=gather),
                       params)
    rng = np.random.default_rng(61)
    weights = {f"w{e}": rand(rng, (n_out, k_in), dtype) for e in range(experts)}
    for n in SIZES:
        slot_rows, offsets = _routing(rng, n, experts, top_k)
        x = rand(rng, (n, k_in) if gather else (n, top_k, k_in), dtype)
        (ours,) = run(module, x, slot_rows, offsets, params=weights)
        _check_grouped(ours, x, slot_rows, offsets, lambda e: T(weights[f"w{e}"]).float(),
                       gather, dtype)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_q_moe_linear_equals_torch_on_the_unpacked_experts(name, gather):
    bits, group, k_in, n_out, scale_dtype, dtype = QUANT_CASES[name]
    experts, top_k = 4, 2
    rng = np.random.default_rng(62)
    params, weights, dense = [], {}, []
    for e in range(experts):
        _, q_weight, q_scale = random_quantized(rng, bits, group, k_in, n_out, scale_dtype)
        weights |= {f"qw{e}": q_weight, f"qs{e}": q_scale}
        params += [(f"qw{e}", q_weight.shape, "uint32"), (f"qs{e}", q_scale.shape, scale_dtype)]
        dense.append(T(unpack_dequantize(q_weight, q_scale, bits, group, k_in)).float())
    x_shape = (N, k_in) if gather else (N, top_k, k_in)
    module = op_module([("x", x_shape, dtype), ("rows", (N, top_k), "int32"),
                        ("offsets", (experts + 1,), "int32")],
                       lambda b, x, r, o, *w: b.emit("q_moe_linear", x, r, o, *w, gather=gather,
                                                     **quant_attrs(bits, group, k_in)),
                       params)
    for n in SIZES:
        slot_rows, offsets = _routing(rng, n, experts, top_k)
        x = rand(rng, (n, k_in) if gather else (n, top_k, k_in), dtype)
        (ours,) = run(module, x, slot_rows, offsets, params=weights)
        _check_grouped(ours, x, slot_rows, offsets, lambda e: dense[e], gather, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("experts", "top_k"), ROUTING)
def test_moe_reduce_adds_each_rows_weighted_slots(experts, top_k, dtype):
    hidden = 16
    module = op_module([("v", (N, top_k, hidden), dtype), ("w", (N, experts), "float32"),
                        ("slots", (N, top_k), "int32")],
                       lambda b, v, w, s: b.emit("moe_reduce", v, w, s))
    rng = np.random.default_rng(63)
    for n in SIZES:
        weights = random_weights(rng, n, experts, top_k)
        _, _, row_slots = torch_dispatch(T(weights), top_k)
        values = rand(rng, (n, top_k, hidden), dtype)
        (ours,) = run(module, values, weights, row_slots.numpy().astype(np.int32))
        flat = T(values).float().reshape(n * top_k, hidden)
        expected = torch.zeros(n, hidden)
        for e in range(experts):  # ascending experts, float32, as the dense combination adds
            rows = torch.nonzero(T(weights)[:, e] != 0)[:, 0]
            j = (T(weights)[rows, :e] != 0).sum(-1)
            contribution = T(weights)[rows, e:e + 1] * flat[row_slots[rows, j]]
            expected.index_add_(0, rows, contribution)
        assert_close(ours, expected.to(getattr(torch, dtype)), dtype)


def torch_sparse_moe_block(x, logits, gate_up, down, top_k: int, dtype):
    """transformers' MixtralSparseMoeBlock: each expert on the rows that chose it."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(len(gate_up)):
        rows, j = torch.where(index == e)
        h = F.linear(x[rows].float(), gate_up[e].float()).to(dtype).float()
        gate, up = h.chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(dtype).float()
        y = F.linear(act, down[e].float()).to(dtype).float()
        out.index_add_(0, rows, y * top[rows, j, None])
    return out.to(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("experts", "top_k"), ROUTING)
def test_sparse_moe_chain_is_mixtrals_sparse_block(experts, top_k, dtype):
    hidden, inter = 16, 12
    params = [(f"gu{e}", (2 * inter, hidden), dtype) for e in range(experts)]
    params += [(f"dn{e}", (hidden, inter), dtype) for e in range(experts)]

    def body(b, x, logits, *w):
        weights = b.emit("moe_route", logits, top_k=top_k)
        rows, offsets, slots = b.emit_multi("moe_dispatch", weights, top_k=top_k)
        h = b.emit("moe_linear", x, rows, offsets, *w[:experts], gather=True)
        d = b.emit("moe_linear", b.silu_mul(h), rows, offsets, *w[experts:], gather=False)
        return b.emit("moe_reduce", d, weights, slots)

    module = op_module([("x", (N, hidden), dtype), ("logits", (N, experts), "float32")],
                       body, params)
    rng = np.random.default_rng(64)
    arrays = {name: rand(rng, shape, dtype, 0.5) for name, shape, _ in params}
    for n in SIZES:
        x, logits = rand(rng, (n, hidden), dtype), rand(rng, (n, experts), "float32", 2.0)
        (ours,) = run(module, x, logits, params=arrays)
        expected = torch_sparse_moe_block(
            T(x), T(logits), [T(arrays[f"gu{e}"]) for e in range(experts)],
            [T(arrays[f"dn{e}"]) for e in range(experts)], top_k, getattr(torch, dtype))
        assert_close(ours, expected, dtype)
