"""LLVM kernels other than linear and attention, against NumPy on random inputs.

One module per activation dtype holds every kernel; each test runs several sequence lengths
through the same binary (symbolic seq_len).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from llvm_cache import (
    TARGET,
    assert_close,
    group_dequantize,
    group_quantize,
    kernel_cache,  # noqa: F401  (pytest fixture)
    tensors,
)

from mlcc.backends.llvm import kernels as K
from mlcc.backends.llvm import schedules
from mlcc.errors import MlccError

HIDDEN, VOCAB, INTER = 72, 50, 40
LENGTHS = (1, 3, 17)
DTYPES = ("float32", "float16")
QUANT = ((4, 32), (3, 40), (8, 32))


def make_kernels(dt: str) -> list:
    n = "seq_len"
    funcs = [
        K.embedding(f"emb_{dt}", n, VOCAB, HIDDEN, dt),
        K.rms_norm(f"rms_{dt}", n, HIDDEN, dt, 1e-5),
        K.rms_norm(f"rms_res_{dt}", n, HIDDEN, dt, 1e-6, weight_offset=1.0, residual=True),
        K.layer_norm(f"ln_{dt}", n, HIDDEN, dt, 1e-5),
        K.layer_norm(f"ln_res_{dt}", n, HIDDEN, dt, 1e-5, residual=True),
        K.silu_mul(f"silu_mul_{dt}", n, INTER, dt),
        K.gelu(f"gelu_{dt}", [n, INTER], dt),
        K.gelu(f"gelu_tanh_{dt}", [n, INTER], dt, approximate="tanh"),
        K.silu(f"silu_{dt}", [n, INTER], dt),
        K.scale(f"scale_{dt}", [n, INTER], dt, 0.125),
        K.add(f"add_{dt}", [n, HIDDEN], dt),
        K.mul(f"mul_{dt}", [n, HIDDEN], dt),
        K.cast(f"cast_{dt}", [n, HIDDEN], dt, "float32" if dt == "float16" else "float16"),
        K.take_last_logits(f"last_logits_{dt}", n, VOCAB, dt),
        K.last_row(f"last_row_{dt}", n, HIDDEN, dt),
    ]
    for bits, group in QUANT:
        funcs.append(K.embedding_q(f"emb_q{bits}_{dt}", n, VOCAB, HIDDEN, bits, group, dt))
    return funcs


@pytest.fixture(scope="module", params=DTYPES)
def built(request, kernel_cache):  # noqa: F811
    dt = request.param
    return dt, kernel_cache.get(f"kernels_{dt}", lambda: make_kernels(dt))


def run(ex, name, *arrays):
    args = tensors(*arrays)
    ex[name](*args)
    return [a.numpy() for a in args]


def rng_for(n: int) -> np.random.Generator:
    return np.random.default_rng(1000 + n)


@pytest.mark.parametrize("n", LENGTHS)
def test_embedding_float_and_quantized(built, n):
    dt, ex = built
    rng = rng_for(n)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(dt)
    ids = rng.integers(0, VOCAB, n).astype(np.int32)
    out = run(ex, f"emb_{dt}", ids, table, np.zeros((n, HIDDEN), dt))[-1]
    np.testing.assert_array_equal(out, table[ids])
    for bits, group in QUANT:
        q, s = group_quantize(table.astype(np.float32), bits, group, dt)
        out = run(ex, f"emb_q{bits}_{dt}", ids, q, s, np.zeros((n, HIDDEN), dt))[-1]
        assert_close(out, group_dequantize(q, s, bits, group, HIDDEN)[ids], dt, 4.0)


def test_embedding_clamps_out_of_range_ids(built):
    dt, ex = built
    table = np.arange(VOCAB * HIDDEN, dtype=np.float32).reshape(VOCAB, HIDDEN).astype(dt)
    ids = np.array([-5, VOCAB + 3], np.int32)
    out = run(ex, f"emb_{dt}", ids, table, np.zeros((2, HIDDEN), dt))[-1]
    np.testing.assert_array_equal(out, table[[0, VOCAB - 1]])


def rms_reference(x, w, eps, offset=0.0):
    x = x.astype(np.float32)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (w.astype(np.float32) + offset)


def ln_reference(x, w, b, eps):
    x = x.astype(np.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w.astype(np.float32) + b.astype(np.float32)


@pytest.mark.parametrize("n", LENGTHS)
def test_norms_with_and_without_residual(built, n):
    dt, ex = built
    rng = rng_for(n)
    x, r = (rng.standard_normal((n, HIDDEN)).astype(dt) * 3 for _ in range(2))
    w, b = (rng.standard_normal(HIDDEN).astype(dt) for _ in range(2))
    empty = np.zeros((n, HIDDEN), dt)
    assert_close(run(ex, f"rms_{dt}", x, w, empty)[-1], rms_reference(x, w, 1e-5), dt, 4.0)
    *_, out, total = run(ex, f"rms_res_{dt}", x, r, w, empty, empty)
    expected_sum = (x.astype(np.float32) + r.astype(np.float32)).astype(dt)
    np.testing.assert_array_equal(total, expected_sum)
    assert_close(out, rms_reference(expected_sum, w, 1e-6, 1.0), dt, 4.0)
    assert_close(run(ex, f"ln_{dt}", x, w, b, empty)[-1], ln_reference(x, w, b, 1e-5), dt, 4.0)
    *_, out, total = run(ex, f"ln_res_{dt}", x, r, w, b, empty, empty)
    np.testing.assert_array_equal(total, expected_sum)
    assert_close(out, ln_reference(expected_sum, w, b, 1e-5), dt, 4.0)


@pytest.mark.parametrize("n", LENGTHS)
def test_activations(built, n):
    dt, ex = built
    rng = rng_for(n)
    gate_up = (rng.standard_normal((n, 2 * INTER)) * 3).astype(dt)
    g = gate_up[:, :INTER].astype(np.float32)
    u = gate_up[:, INTER:].astype(np.float32)
    empty = np.zeros((n, INTER), dt)
    silu = g / (1 + np.exp(-g))
    assert_close(run(ex, f"silu_mul_{dt}", gate_up, empty)[-1], silu * u, dt, 8.0)
    x = np.ascontiguousarray(gate_up[:, :INTER])
    erf = np.vectorize(math.erf)
    assert_close(run(ex, f"gelu_{dt}", x, empty)[-1], 0.5 * g * (1 + erf(g / math.sqrt(2))), dt,
                 4.0)
    tanh = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    assert_close(run(ex, f"gelu_tanh_{dt}", x, empty)[-1], tanh, dt, 4.0)
    assert_close(run(ex, f"silu_{dt}", x, empty)[-1], silu, dt, 4.0)
    assert_close(run(ex, f"scale_{dt}", x, empty)[-1], g * 0.125, dt)


@pytest.mark.parametrize("n", LENGTHS)
def test_binary_cast_and_last_row(built, n):
    dt, ex = built
    rng = rng_for(n)
    a, b = (rng.standard_normal((n, HIDDEN)).astype(dt) for _ in range(2))
    empty = np.zeros((n, HIDDEN), dt)
    af, bf = a.astype(np.float32), b.astype(np.float32)
    assert_close(run(ex, f"add_{dt}", a, b, empty)[-1], af + bf, dt, 4.0)
    assert_close(run(ex, f"mul_{dt}", a, b, empty)[-1], af * bf, dt, 4.0)
    other = "float32" if dt == "float16" else "float16"
    cast = run(ex, f"cast_{dt}", a, np.zeros((n, HIDDEN), other))[-1]
    np.testing.assert_array_equal(cast, a.astype(other))
    logits = rng.standard_normal((n, VOCAB)).astype(dt)
    last = run(ex, f"last_logits_{dt}", logits, np.zeros(VOCAB, np.float32))[-1]
    np.testing.assert_array_equal(last, logits[-1].astype(np.float32))
    row = run(ex, f"last_row_{dt}", a, np.zeros((1, HIDDEN), dt))[-1]
    np.testing.assert_array_equal(row, a[-1:])


@pytest.fixture(scope="module")
def sampling(kernel_cache):  # noqa: F811
    return kernel_cache.get("sampling", lambda: [
        K.argmax("argmax_1000", 1000), K.softmax_with_temperature("softmax_t_1000", 1000)])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_argmax_and_softmax_with_temperature(sampling, temperature):
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(1000) * 20).astype(np.float32)
    logits[[10, 900]] = logits.max() + 1  # a tie: the first index wins, as in NumPy
    index = run(sampling, "argmax_1000", logits, np.zeros(1, np.int32))[-1]
    assert index[0] == np.argmax(logits) == 10
    probs = sampling["softmax_t_1000"]
    args = tensors(logits, np.zeros(1000, np.float32))
    probs(args[0], temperature, args[1])
    z = logits.astype(np.float64) / temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(args[1].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_schedule_rules_pick_rows_elementwise_then_fallback():
    from tvm import te

    norm = K.rms_norm("r", "seq_len", 64, "float32", 1e-5)
    assert "T.parallel" in norm.script() and "T.vectorized" in norm.script()
    act = K.silu_mul("s", 4, 64, "float32")
    assert schedules.rows_rule(act.without_attr("tirx.is_scheduled")) is None
    x = te.placeholder((64,), "float32", name="x")
    k = te.reduce_axis((0, 64), name="k")
    total = te.compute((1,), lambda _: te.sum(x[k], axis=k), name="total")
    share = te.compute((64,), lambda j: x[j] / total[0], name="share")
    func = te.create_prim_func([x, share])
    assert schedules.rows_rule(func) is None and schedules.elementwise_rule(func) is None
    scheduled = schedules.schedule_blocks(func.with_attr("global_symbol", "share"))
    assert scheduled.attrs["tirx.is_scheduled"]
    x_np = np.random.default_rng(3).random(64).astype(np.float32)
    out = run(tvm.compile(scheduled, target=TARGET), "share", x_np, np.zeros(64, np.float32))
    np.testing.assert_allclose(out[-1], x_np / x_np.sum(), rtol=1e-6)


def test_bad_requests_fail_with_one_line():
    with pytest.raises(MlccError, match="dtype 'bfloat16' is not supported"):
        K.rms_norm("r", "seq_len", 64, "bfloat16", 1e-5)
    with pytest.raises(MlccError, match="approximate='fast'"):
        K.gelu("g", [4], "float32", approximate="fast")
    with pytest.raises(MlccError, match="group_size 30 must be a positive multiple"):
        K.embedding_q("e", "seq_len", 10, 64, 4, 30, "float16")
    with pytest.raises(MlccError, match="symbol name"):
        K.embedding("e", "seq len", 10, 64, "float16")
