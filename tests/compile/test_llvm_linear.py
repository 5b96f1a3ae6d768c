"""Linear kernels (float and group-quantized weights) against NumPy, for every schedule rule.

K = 172 is not a multiple of any group size, so the zero padding of K_pad is exercised; N = 37
is not a multiple of the 4-row blocks. The quantized reference dequantizes with an independent
NumPy implementation of design.md §5.
"""

from __future__ import annotations

import numpy as np
import pytest
from llvm_cache import (
    assert_close,
    group_dequantize,
    group_quantize,
    kernel_cache,  # noqa: F401  (pytest fixture)
    tensors,
)

from mlcc.backends.layouts import GroupQuantLayout
from mlcc.backends.llvm import linear as L
from mlcc.errors import MlccError

K_IN, N_OUT = 172, 37
QUANTS = (None, (4, 32), (3, 40), (8, 32))
RULES = {"gemv": L.gemv_rule, "gemm": L.gemm_rule, "fallback": L.linear_fallback,
         "gemvbytes": L.gemv_bytes_rule}


def specs(dt: str) -> list[tuple[str, L.LinearSpec]]:
    """(kernel name, spec) for every rule, weight format and output mode."""
    out = []
    for quant in QUANTS:
        layout = GroupQuantLayout(quant[0], quant[1], K_IN) if quant else None
        tag = f"q{quant[0]}" if quant else "f"
        out += [
            (f"gemv_{tag}_{dt}", L.LinearSpec(1, K_IN, N_OUT, dt, dt, layout, True)),
            (f"gemv_last_{tag}_{dt}", L.LinearSpec("seq_len", K_IN, N_OUT, dt, dt, layout,
                                                   False, True)),
            (f"gemm_{tag}_{dt}", L.LinearSpec("seq_len", K_IN, N_OUT, dt, dt, layout, True)),
            (f"fallback_{tag}_{dt}", L.LinearSpec("seq_len", K_IN, N_OUT, dt, dt, layout,
                                                  True)),
            (f"fallback_last_{tag}_{dt}", L.LinearSpec("seq_len", K_IN, N_OUT, dt, dt, layout,
                                                       False, True)),
        ]
        if quant and quant[0] in (4, 8):
            out += [(f"gemvbytes_{tag}_{dt}", L.LinearSpec(1, K_IN, N_OUT, dt, dt, layout,
                                                           True)),
                    (f"gemvbytes_last_{tag}_{dt}", L.LinearSpec("seq_len", K_IN, N_OUT, dt, dt,
                                                                layout, False, True))]
    return out


def make(dt: str) -> list:
    funcs = []
    for name, spec in specs(dt):
        rule = RULES[name.split("_")[0]]
        funcs.append(L.finish(rule(spec), name))
    return funcs


@pytest.fixture(scope="module", params=["float32", "float16"])
def built(request, kernel_cache):  # noqa: F811
    dt = request.param
    return dt, kernel_cache.get(f"linear_{dt}", lambda: make(dt))


def weights(quant, dt, rng):
    w = rng.standard_normal((N_OUT, K_IN)).astype(np.float32)
    if quant is None:
        return [w.astype(dt)], w.astype(dt).astype(np.float32)
    q, s = group_quantize(w, quant[0], quant[1], dt)
    return [q, s], group_dequantize(q, s, quant[0], quant[1], K_IN)


def cases(rules):
    return [(q, r) for r in rules for q in QUANTS if r != "gemvbytes" or (q and q[0] in (4, 8))]


@pytest.mark.parametrize("quant,rule", cases(["gemv", "gemvbytes", "gemm", "fallback"]))
def test_linear_matches_numpy(built, quant, rule):
    dt, ex = built
    tag = f"q{quant[0]}" if quant else "f"
    rng = np.random.default_rng(hash((rule, tag)) % 2**32)
    w_args, w_ref = weights(quant, dt, rng)
    bias = rng.standard_normal(N_OUT).astype(dt)
    for n in ((1,) if rule.startswith("gemv") else (1, 5, 9, 33)):
        x = rng.standard_normal((n, K_IN)).astype(dt)
        expected = x.astype(np.float32) @ w_ref.T + bias.astype(np.float32)
        args = tensors(x, *w_args, bias, np.zeros((n, N_OUT), dt))
        ex[f"{rule}_{tag}_{dt}"](*args)
        assert_close(args[-1].numpy(), expected, dt, scale=np.abs(expected).max())


@pytest.mark.parametrize("quant,rule", cases(["gemv", "gemvbytes", "fallback"]))
def test_last_row_only_multiplies_the_last_row(built, quant, rule):
    dt, ex = built
    tag = f"q{quant[0]}" if quant else "f"
    rng = np.random.default_rng(5)
    w_args, w_ref = weights(quant, dt, rng)
    for n in (1, 6, 40):
        x = rng.standard_normal((n, K_IN)).astype(dt)
        x[:-1] = np.nan  # rows other than the last must not be read
        args = tensors(x, *w_args, np.zeros(N_OUT, np.float32))
        ex[f"{rule}_last_{tag}_{dt}"](*args)
        expected = x[-1].astype(np.float32) @ w_ref.T
        assert_close(args[-1].numpy(), expected, dt, scale=np.abs(expected).max())


def test_rules_are_tried_in_order():
    decode = L.LinearSpec(1, 64, 32, "float32", "float32")
    prefill = L.LinearSpec("seq_len", 64, 32, "float32", "float32")
    assert L.gemm_rule(decode) is None and L.gemv_rule(prefill) is None
    assert L.gemv_bytes_rule(decode) is None  # float weights
    q3 = L.LinearSpec(1, 64, 32, "float32", "float32", GroupQuantLayout(3, 40, 64))
    assert L.gemv_bytes_rule(q3) is None and L.gemv_rule(q3) is not None
    q8 = L.LinearSpec(1, 64, 32, "float32", "float32", GroupQuantLayout(8, 32, 64))
    assert L.gemv_bytes_rule(q8) is not None
    q8_group8 = L.LinearSpec(1, 64, 32, "float32", "float32", GroupQuantLayout(8, 8, 64))
    assert L.gemv_bytes_rule(q8_group8) is None  # 8 bytes a group: less than one load
    chosen = L.schedule_linear(prefill, rules=[L.gemv_rule, L.linear_fallback])
    assert "T.parallel(T.int64(32))" in chosen.script() or "T.parallel(32)" in chosen.script()
    with pytest.raises(MlccError, match="no linear schedule accepts"):
        L.schedule_linear(prefill, rules=[L.gemv_rule])


def test_public_generators_name_and_drop_unused_arguments():
    f = L.linear_q("proj", "seq_len", 64, 32, 4, 32, "float16", bias=False)
    assert f.attrs["global_symbol"] == "proj"
    assert [p.name for p in f.params] == ["x", "q_weight", "q_scale", "out"]
    g = L.linear("head", "seq_len", 64, 32, "float32", bias=True, last_row=True)
    assert [p.name for p in g.params] == ["x", "weight", "bias", "out"]
    assert str(g.params[-1].dtype) == "float32" and len(g.params[-1].shape) == 1


def test_quant_layout_errors_are_one_line():
    with pytest.raises(MlccError, match="3, 4 or 8"):
        L.linear_q("p", 1, 64, 32, 5, 32, "float16")
    with pytest.raises(MlccError, match="in_features"):
        L.linear("p", 1, 0, 32, "float16")


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32)])
def test_gemv_bytes_prefetch_changes_no_value(kernel_cache, bits, group):  # noqa: F811
    """The decode GEMV's software prefetch (once per cache line, two row blocks ahead, clamped
    to the last row) is a hint: with it and without it the outputs are bit for bit equal."""
    k, n_out, dt = 300, 37, "float16"
    layout = GroupQuantLayout(bits, group, k)
    spec = L.LinearSpec(1, k, n_out, dt, dt, layout, True)
    on, off = L.gemv_bytes_rule(spec), L.gemv_bytes_rule(spec, prefetch_blocks=0)
    assert "llvm.prefetch" in on.script() and "llvm.prefetch" not in off.script()
    ex = kernel_cache.get(f"gemvbytes_prefetch_{bits}_{group}",
                          lambda: [L.finish(on, "on"), L.finish(off, "off")])
    rng = np.random.default_rng(group + bits)
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    q, s = group_quantize(w, bits, group, dt)
    x = rng.standard_normal((1, k)).astype(dt)
    bias = rng.standard_normal(n_out).astype(dt)
    outs = {}
    for name in ("on", "off"):
        args = tensors(x, q, s, bias, np.zeros((1, n_out), dt))
        ex[name](*args)
        outs[name] = args[-1].numpy()
    np.testing.assert_array_equal(outs["on"], outs["off"])
    expected = x.astype(np.float32) @ group_dequantize(q, s, bits, group, k).T + bias
    assert_close(outs["on"], expected, dt, scale=np.abs(expected).max())


@pytest.mark.parametrize("wdt", ["float16", "float32"])
def test_gemv_prefetch_of_float_weights_changes_no_value(kernel_cache, wdt):  # noqa: F811
    """The float-weight GEMV prefetches its rows ahead (3-bit codes do not); the outputs equal
    those without the prefetch bit for bit."""
    k, n_out = 300, 37
    spec = L.LinearSpec(1, k, n_out, "float16", wdt, None, True)
    on, off = L.gemv_rule(spec), L.gemv_rule(spec, prefetch_blocks=0)
    assert "llvm.prefetch" in on.script() and "llvm.prefetch" not in off.script()
    q3 = L.LinearSpec(1, k, n_out, "float16", "float16", GroupQuantLayout(3, 40, k), True)
    assert "llvm.prefetch" not in L.gemv_rule(q3).script()
    ex = kernel_cache.get(f"gemv_prefetch_{wdt}",
                          lambda: [L.finish(on, "on"), L.finish(off, "off")])
    rng = np.random.default_rng(3)
    w = rng.standard_normal((n_out, k)).astype(wdt)
    x = rng.standard_normal((1, k)).astype(np.float16)
    bias = rng.standard_normal(n_out).astype(wdt)
    outs = {}
    for name in ("on", "off"):
        args = tensors(x, w, bias, np.zeros((1, n_out), np.float16))
        ex[name](*args)
        outs[name] = args[-1].numpy()
    np.testing.assert_array_equal(outs["on"], outs["off"])
    expected = x.astype(np.float32) @ w.astype(np.float32).T + bias.astype(np.float32)
    assert_close(outs["on"], expected, "float16", scale=np.abs(expected).max())
