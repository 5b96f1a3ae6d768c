"""Every op's NumPy reference, run through `ir.interpret`, against PyTorch on random inputs.

Each op runs inside a one-function module whose input has the symbolic dim `n`, for several
bound sizes, so the symbolic shape handling of the interpreter is exercised as well. Torch
computes in the op's dtype where it can; float32 must agree to 1e-5, float16 to a few ulps.
The references for rope, attention and the quantized ops are in ir_op_references.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ir_op_references import (
    SIZES,
    N,
    T,
    assert_close,
    exact_inv_freq,
    llama3_inv_freq,
    llama31_scaling,
    op_module,
    pack_codes,
    rand,
    reference_attention,
    reference_inv_freq,
    run,
    sized,
    torch_inv_freq,
    torch_rope,
    unpack_dequantize,
)

from mlcc import ir
from mlcc.ir.kv import rope_inv_freq

# --- elementwise ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("op", "torch_op"), [("add", torch.add), ("mul", torch.mul)])
@pytest.mark.parametrize(("lhs", "rhs"), [((N, 4), (4,)), ((N, 1, 4), (3, 1)), ((1, N), (N, 1))])
def test_broadcasting_binary_ops(op, torch_op, lhs, rhs, dtype):
    module = op_module([("a", lhs, dtype), ("b", rhs, dtype)], lambda b, x, y: b.emit(op, x, y))
    rng = np.random.default_rng(0)
    for n in SIZES:
        x, y = rand(rng, sized(lhs, n), dtype), rand(rng, sized(rhs, n), dtype)
        (ours,) = run(module, x, y)
        assert_close(ours, torch_op(T(x), T(y)), dtype)


@pytest.mark.parametrize("op", ["add", "mul"])
def test_integer_add_and_mul_stay_integer(op):
    module = op_module([("a", (N, 3), "int32"), ("b", (3,), "int32")],
                       lambda b, x, y: b.emit(op, x, y))
    rng = np.random.default_rng(1)
    for n in SIZES:
        x = rng.integers(-1000, 1000, (n, 3), dtype=np.int32)
        y = rng.integers(-1000, 1000, (3,), dtype=np.int32)
        (ours,) = run(module, x, y)
        assert ours.dtype == np.int32
        np.testing.assert_array_equal(ours, getattr(torch, op)(T(x), T(y)).numpy())


UNARY = {
    "scale 0.125": (lambda b, x: b.scale(x, 0.125), lambda t: t * 0.125),
    "scale -3.5": (lambda b, x: b.scale(x, -3.5), lambda t: t * -3.5),
    "silu": (lambda b, x: b.silu(x), F.silu),
    "gelu none": (lambda b, x: b.gelu(x), lambda t: F.gelu(t, approximate="none")),
    "gelu tanh": (lambda b, x: b.gelu(x, "tanh"), lambda t: F.gelu(t, approximate="tanh")),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", list(UNARY))
def test_unary_ops(name, dtype):
    emit, torch_fn = UNARY[name]
    module = op_module([("x", (N, 2, 16), dtype)], emit)
    rng = np.random.default_rng(2)
    for n in SIZES:
        x = rand(rng, (n, 2, 16), dtype, scale=4.0)
        x[0, 0, :4] = [-60.0, -12.0, 12.0, 60.0]  # tails where exp under/overflows
        (ours,) = run(module, x)
        assert_close(ours, torch_fn(T(x)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_silu_mul_is_silu_of_gate_times_up(dtype):
    module = op_module([("gate_up", (N, 24), dtype)], lambda b, x: b.silu_mul(x))
    rng = np.random.default_rng(3)
    for n in SIZES:
        x = rand(rng, (n, 24), dtype, scale=2.0)
        gate, up = T(x).chunk(2, dim=-1)
        (ours,) = run(module, x)
        assert_close(ours, F.silu(gate) * up, dtype)


@pytest.mark.parametrize(("src", "dst"), [
    ("float32", "float16"), ("float16", "float32"), ("float32", "int32"), ("float16", "int64"),
    ("int32", "float32"), ("int32", "int64"), ("int64", "int32"), ("int32", "float16"),
])
def test_cast(src, dst):
    module = op_module([("x", (N, 5), src)], lambda b, x: b.cast(x, dst))
    rng = np.random.default_rng(4)
    for n in SIZES:
        if src.startswith("float"):
            x = rand(rng, (n, 5), src, scale=100.0)  # fractions of both signs: truncation
        else:
            x = rng.integers(-2000, 2000, (n, 5)).astype(src)
        (ours,) = run(module, x)
        ref = T(x).to(getattr(torch, dst))
        assert ours.dtype == np.dtype(dst)
        np.testing.assert_array_equal(ours, ref.numpy())


# --- normalization --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_with_weight_offset(offset, dtype):
    module = op_module([("x", (N, 32), dtype)], lambda b, x, w: b.rms_norm(x, w, 1e-6, offset),
                       params=[("w", (32,), dtype)])
    rng = np.random.default_rng(5)
    w = rand(rng, (32,), dtype, 0.5)
    for n in SIZES:
        x = rand(rng, (n, 32), dtype, scale=3.0)
        (ours,) = run(module, x, params={"w": w})
        ref = F.rms_norm(T(x).float(), (32,), weight=T(w).float() + offset, eps=1e-6)
        assert_close(ours, ref.to(getattr(torch, dtype)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layer_norm(dtype):
    module = op_module([("x", (2, N, 24), dtype)], lambda b, x, w, c: b.layer_norm(x, w, c, 1e-5),
                       params=[("w", (24,), dtype), ("c", (24,), dtype)])
    rng = np.random.default_rng(6)
    w, c = rand(rng, (24,), dtype), rand(rng, (24,), dtype)
    for n in SIZES:
        x = (rand(rng, (2, n, 24), dtype, scale=2.0) + 5).astype(dtype)  # a mean to remove
        (ours,) = run(module, x, params={"w": w, "c": c})
        assert_close(ours, F.layer_norm(T(x), (24,), T(w), T(c), eps=1e-5), dtype)


# --- embedding, linear, matmul --------------------------------------------------------------


@pytest.mark.parametrize("ids_dtype", ["int32", "int64"])
@pytest.mark.parametrize("ids_shape", [(N,), (N, 2)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding(ids_shape, ids_dtype, dtype):
    module = op_module([("ids", ids_shape, ids_dtype)], lambda b, ids, t: b.embedding(t, ids),
                       params=[("table", (50, 12), dtype)])
    rng = np.random.default_rng(7)
    table = rand(rng, (50, 12), dtype)
    for n in SIZES:
        ids = rng.integers(0, 50, sized(ids_shape, n)).astype(ids_dtype)
        ids.flat[0], ids.flat[-1] = 0, 49
        (ours,) = run(module, ids, params={"table": table})
        assert_close(ours, F.embedding(T(ids).long(), T(table)), dtype, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_shape", [(N, 16), (2, N, 16), (16,)])
def test_linear(x_shape, bias, dtype):
    params = [("w", (10, 16), dtype)] + ([("bias", (10,), dtype)] if bias else [])
    module = op_module([("x", x_shape, dtype)], lambda b, x, *wb: b.linear(x, *wb), params)
    rng = np.random.default_rng(8)
    weights = {name: rand(rng, shape, dtype, 0.5) for name, shape, _ in params}
    for n in SIZES:
        x = rand(rng, sized(x_shape, n), dtype)
        (ours,) = run(module, x, params=weights)
        ref = F.linear(T(x), T(weights["w"]), T(weights["bias"]) if bias else None)
        assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("lhs", "rhs"), [
    ((N, 4, 6), (6, 3)),            # batched lhs, plain rhs
    ((2, 1, N, 6), (3, 6, 5)),      # batch dims broadcast both ways
    ((N, 1, 4, 6), (1, 2, 6, 3)),   # symbolic batch dim
    ((3, N), (N, 2)),               # symbolic contracted dim
])
def test_matmul_batched_and_broadcast(lhs, rhs, dtype):
    module = op_module([("a", lhs, dtype), ("b", rhs, dtype)], lambda b, x, y: b.matmul(x, y))
    rng = np.random.default_rng(9)
    for n in SIZES:
        a, c = rand(rng, sized(lhs, n), dtype), rand(rng, sized(rhs, n), dtype)
        (ours,) = run(module, a, c)
        assert_close(ours, torch.matmul(T(a), T(c)), dtype)


# --- shape ops ------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [
    ((N, 6), (N, 2, 3)), ((N, 6), (2, N, 3)), ((2, N, 3), (6, N)), ((N, 4), (4, 1, N)),
])
def test_reshape(src, dst):
    module = op_module([("x", src, "float32")], lambda b, x: b.reshape(x, dst))
    rng = np.random.default_rng(10)
    for n in SIZES:
        x = rand(rng, sized(src, n), "float32")
        (ours,) = run(module, x)
        assert_close(ours, T(x).reshape(sized(dst, n)), "float32", rtol=0, atol=0)


@pytest.mark.parametrize(("shape", "sizes", "axis"), [
    ((N, 10), (2, 3, 5), -1), ((N, 6, 2), (1, 5), 1), ((7, N), (4, 3), 0),
])
def test_split(shape, sizes, axis):
    module = op_module([("x", shape, "float16")], lambda b, x: b.split(x, sizes, axis))
    rng = np.random.default_rng(11)
    for n in SIZES:
        x = rand(rng, sized(shape, n), "float16")
        ours = run(module, x)
        refs = torch.split(T(x), list(sizes), dim=axis)
        assert len(ours) == len(refs) == len(sizes)
        for piece, ref in zip(ours, refs, strict=True):
            assert_close(piece, ref, "float16", rtol=0, atol=0)


@pytest.mark.parametrize(("shapes", "axis"), [
    (((N, 2), (N, 3), (N, 1)), -1), (((2, N), (3, N)), 0), (((N, 2, 4), (N, 3, 4)), 1),
])
def test_concat(shapes, axis):
    inputs = [(f"x{i}", s, "float32") for i, s in enumerate(shapes)]
    module = op_module(inputs, lambda b, *xs: b.concat(xs, axis))
    rng = np.random.default_rng(12)
    for n in SIZES:
        xs = [rand(rng, sized(s, n), "float32") for s in shapes]
        (ours,) = run(module, *xs)
        assert_close(ours, torch.cat([T(x) for x in xs], dim=axis), "float32", rtol=0, atol=0)


@pytest.mark.parametrize("perm", [(2, 0, 1), (1, 0, 2), (0, 2, 1), (2, 1, 0)])
def test_transpose(perm):
    module = op_module([("x", (N, 2, 3), "float32")], lambda b, x: b.transpose(x, perm))
    rng = np.random.default_rng(13)
    for n in SIZES:
        x = rand(rng, (n, 2, 3), "float32")
        (ours,) = run(module, x)
        assert ours.flags.c_contiguous
        assert_close(ours, T(x).permute(*perm), "float32", rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(axis, dtype):
    module = op_module([("x", (N, 3, 7), dtype)], lambda b, x: b.softmax(x, axis))
    rng = np.random.default_rng(14)
    for n in SIZES:
        x = rand(rng, (n, 3, 7), dtype, scale=30.0)  # large logits: needs the max shift
        (ours,) = run(module, x)
        assert np.isfinite(ours).all()
        assert_close(ours, torch.softmax(T(x).float(), dim=axis).to(getattr(torch, dtype)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_last_logits_is_the_last_row_in_float32(dtype):
    module = op_module([("x", (N, 40), dtype)], lambda b, x: b.last_logits(x))
    rng = np.random.default_rng(15)
    for n in SIZES:
        x = rand(rng, (n, 40), dtype, scale=10.0)
        (ours,) = run(module, x)
        assert_close(ours, T(x)[-1].float(), "float32", rtol=0, atol=0)


# --- rope -----------------------------------------------------------------------------------


LLAMA3_SMALL = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


ROPE_CASES = {
    # name: (heads, head_dim, rotary_dim, style, theta, scaling, first position, dtype)
    "rotate_half": (2, 16, 16, "rotate_half", 10000.0, None, 0, "float32"),
    "rotate_half offset": (2, 16, 16, "rotate_half", 10000.0, None, 37, "float32"),
    "interleaved offset": (3, 8, 8, "interleaved", 10000.0, None, 37, "float32"),
    "rotate_half partial": (2, 16, 8, "rotate_half", 10000.0, None, 11, "float32"),
    "interleaved partial": (2, 12, 4, "interleaved", 10000.0, None, 11, "float32"),
    "linear scaling": (2, 16, 16, "rotate_half", 10000.0,
                       {"rope_type": "linear", "factor": 4.0}, 300, "float32"),
    "llama3 three regimes": (2, 16, 16, "rotate_half", 10000.0, LLAMA3_SMALL, 200, "float32"),
    "llama3.1-8b far position": (1, 128, 128, "rotate_half", 500000.0, "llama3.1", 9000,
                                 "float32"),
    "float16": (4, 16, 16, "rotate_half", 10000.0, None, 37, "float16"),
    "float16 interleaved": (4, 16, 16, "interleaved", 10000.0, None, 37, "float16"),
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope(name):
    heads, head_dim, rotary_dim, style, theta, scaling, start, dtype = ROPE_CASES[name]
    scaling = llama31_scaling() if scaling == "llama3.1" else scaling
    module = op_module([("x", (N, heads, head_dim), dtype), ("pos", (N,), "int32")],
                       lambda b, x, p: b.rope(x, p, theta, rotary_dim, style, scaling))
    inv = reference_inv_freq(rotary_dim, theta, scaling)
    rng = np.random.default_rng(16)
    for n in SIZES:
        x = rand(rng, (n, heads, head_dim), dtype)
        pos = np.arange(start, start + n, dtype=np.int32)
        (ours,) = run(module, x, pos)
        xt = T(x).float()
        rotated = torch_rope(xt[..., :rotary_dim], T(pos), inv, style)
        ref = torch.cat([rotated, xt[..., rotary_dim:]], dim=-1).to(getattr(torch, dtype))
        assert_close(ours, ref, dtype)
        np.testing.assert_array_equal(ours[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize(("rotary_dim", "theta", "scaling"), [
    (64, 10000.0, None), (128, 500000.0, None), (96, 1000000.0, {"rope_type": "linear",
                                                                  "factor": 3.0}),
    (16, 10000.0, LLAMA3_SMALL), (128, 500000.0, "llama3.1"),
])
def test_rope_frequencies_are_the_exact_formula_rounded_once(rotary_dim, theta, scaling):
    # Positions up to 10^5 multiply these; each float32 ulp of error costs 1e-2 radians there.
    scaling = llama31_scaling() if scaling == "llama3.1" else scaling
    ours = rope_inv_freq(rotary_dim, theta, scaling)
    exact = exact_inv_freq(rotary_dim, theta, scaling)
    assert ours.dtype == np.float32
    error_ulps = np.abs(ours.astype(np.float64) - exact.numpy()) / np.spacing(ours)
    assert error_ulps.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("scaling", [LLAMA3_SMALL, "llama3.1"], ids=["small", "llama3.1-8b"])
def test_llama3_frequencies_cover_all_three_regimes(scaling):
    # The rope tests above only prove the formula if each of its branches is taken.
    scaling = llama31_scaling() if scaling == "llama3.1" else scaling
    rotary_dim, theta = (16, 10000.0) if scaling is LLAMA3_SMALL else (128, 500000.0)
    inv = torch_inv_freq(rotary_dim, theta)
    scaled = llama3_inv_freq(inv, scaling)
    ratio = (inv / scaled).numpy()
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, scaling["factor"]).any()
    assert ((ratio > 1.001) & (ratio < scaling["factor"] - 1e-3)).any()


# --- positions and attention over the KV cache ----------------------------------------------


ATTENTION_CASES = {
    # name: (heads, kv_heads, head_dim, window, sinks, scale, dtype)
    "gqa causal": (4, 2, 8, -1, 0, None, "float32"),
    "mqa explicit scale": (4, 1, 8, -1, 0, 0.3, "float32"),
    "mha": (2, 2, 4, -1, 0, None, "float32"),
    "sliding window": (4, 2, 8, 4, 0, None, "float32"),
    "sliding window and sinks": (4, 2, 8, 4, 2, None, "float32"),
    "float16 window and sinks": (4, 2, 8, 5, 3, None, "float16"),
}
CHUNKS = (5, 3, 1, 1, 4)  # prefill, a second chunk at an offset, two decode steps, a last chunk


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_and_positions_over_chunks(name):
    heads, kv_heads, d, window, sinks, scale, dtype = ATTENTION_CASES[name]
    layers = 2
    capacity = window + sinks if window > 0 else sum(CHUNKS)
    cache_type = ir.KVCacheType(layers, kv_heads, d, dtype, capacity, window, sinks)
    qkv = [(f"{t}{layer}", (N, heads if t == "q" else kv_heads, d), dtype)
           for layer in range(layers) for t in "qkv"]

    def body(b, *values):
        *tensors, cache = values
        outs = [b.attention(*tensors[3 * i:3 * i + 3], cache, layer=i, scale=scale)
                for i in range(layers)]
        return (b.positions(cache, N), *outs)

    module = op_module(qkv + [("kv_cache", cache_type)], body)
    state = ir.KVCacheState(cache_type)
    history = {name: [] for name, _, _ in qkv if name[0] in "kv"}
    rng = np.random.default_rng(17)
    start = 0
    for n in CHUNKS:
        arrays = {name: rand(rng, sized(shape, n), dtype) for name, shape, _ in qkv}
        pos, *outs = run(module, *arrays.values(), state)
        np.testing.assert_array_equal(pos, torch.arange(start, start + n, dtype=torch.int32))
        for name in history:
            history[name].append(T(arrays[name]).float())
        for layer, ours in enumerate(outs):
            keys = torch.cat(history[f"k{layer}"]).to(getattr(torch, dtype)).float()
            values = torch.cat(history[f"v{layer}"]).to(getattr(torch, dtype)).float()
            ref = reference_attention(T(arrays[f"q{layer}"]).float(), keys, values, start,
                                      window, sinks, scale)
            assert_close(ours, ref.to(getattr(torch, dtype)), dtype)
        start += n
        assert state.length == start


def test_attention_refuses_to_overflow_a_full_cache():
    cache_type = ir.KVCacheType(1, 1, 4, "float32", capacity=4)
    module = op_module([("q", (N, 1, 4), "float32"), ("k", (N, 1, 4), "float32"),
                        ("v", (N, 1, 4), "float32"), ("kv_cache", cache_type)],
                       lambda b, q, k, v, c: b.attention(q, k, v, c, layer=0))
    state = ir.KVCacheState(cache_type)
    x = np.zeros((3, 1, 4), np.float32)
    run(module, x, x, x, state)
    with pytest.raises(ir.InterpretError, match="3 cached \\+ 3 new positions exceed"):
        run(module, x, x, x, state)


# --- group-quantized linear and embedding ---------------------------------------------------


QUANT_CASES = {
    # name: (bits, group_size, in_features, out_features, scale dtype, activation dtype)
    "q4 group 32, f16": (4, 32, 64, 12, "float16", "float16"),
    "q4 padded K, f32": (4, 32, 50, 12, "float32", "float32"),
    "q3 group 40, padded K, f16": (3, 40, 70, 8, "float16", "float16"),
    "q8 padded K, f32": (8, 32, 40, 6, "float32", "float32"),
    # float32 math on float16 scales: shows that the weight is rounded to the scale dtype
    "q4 f16 scales, f32 activations": (4, 32, 64, 12, "float16", "float32"),
}


def random_quantized(rng, bits: int, group: int, k: int, rows: int, dtype: str):
    k_pad = -(-k // group) * group
    codes = rng.integers(0, 2**bits, (rows, k_pad))  # the padding holds junk on purpose
    scales = rng.uniform(0.01, 0.1, (rows, k_pad // group)).astype(dtype)
    return codes, pack_codes(codes, bits), scales


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_unpacker_reads_back_the_packed_codes(name):
    bits, group, k, rows, _, _ = QUANT_CASES[name]
    codes, q_weight, _ = random_quantized(np.random.default_rng(18), bits, group, k, rows,
                                          "float32")
    ones = np.ones((rows, codes.shape[1] // group), np.float32)
    w = unpack_dequantize(q_weight, ones, bits, group, k)
    np.testing.assert_array_equal(w, codes[:, :k] - (2 ** (bits - 1) - 1))


def quant_attrs(bits: int, group: int, k: int) -> dict:
    return {"bits": bits, "group_size": group, "in_features": k}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_q_linear_equals_torch_linear_on_the_unpacked_weight(name, bias):
    bits, group, k, rows, scale_dtype, dtype = QUANT_CASES[name]
    rng = np.random.default_rng(19)
    _, q_weight, q_scale = random_quantized(rng, bits, group, k, rows, scale_dtype)
    weights = {"q_weight": q_weight, "q_scale": q_scale}
    params = [("q_weight", q_weight.shape, "uint32"), ("q_scale", q_scale.shape, scale_dtype)]
    if bias:
        weights["bias"] = rand(rng, (rows,), dtype)
        params.append(("bias", (rows,), dtype))
    module = op_module([("x", (N, k), dtype)],
                       lambda b, x, *w: b.emit("q_linear", x, *w, **quant_attrs(bits, group, k)),
                       params)
    w = T(unpack_dequantize(q_weight, q_scale, bits, group, k)).float()
    for n in SIZES:
        x = rand(rng, (n, k), dtype)
        (ours,) = run(module, x, params=weights)
        ref = F.linear(T(x).float(), w, T(weights["bias"]).float() if bias else None)
        assert_close(ours, ref.to(getattr(torch, dtype)), dtype)


@pytest.mark.parametrize("ids_shape", [(N,), (N, 2)])
@pytest.mark.parametrize("name", [name for name, case in QUANT_CASES.items() if case[4] == case[5]])
def test_q_embedding_equals_rows_of_the_unpacked_table(name, ids_shape):
    bits, group, k, rows, dtype, _ = QUANT_CASES[name]
    rng = np.random.default_rng(20)
    _, q_weight, q_scale = random_quantized(rng, bits, group, k, rows, dtype)
    params = [("q_weight", q_weight.shape, "uint32"), ("q_scale", q_scale.shape, dtype)]
    module = op_module([("ids", ids_shape, "int32")],
                       lambda b, ids, qw, qs: b.emit("q_embedding", qw, qs, ids,
                                                     **quant_attrs(bits, group, k)),
                       params)
    table = T(unpack_dequantize(q_weight, q_scale, bits, group, k))
    for n in SIZES:
        ids = rng.integers(0, rows, sized(ids_shape, n)).astype(np.int32)
        ids.flat[-1] = rows - 1
        (ours,) = run(module, ids, params={"q_weight": q_weight, "q_scale": q_scale})
        assert_close(ours, F.embedding(T(ids).long(), table), dtype, rtol=0, atol=0)
