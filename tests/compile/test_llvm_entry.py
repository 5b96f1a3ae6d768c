"""Entry functions: several kernels called from one compiled host function.

The entries here run an embedding, a norm, a projection and a KV append into per-layer views of
one page pool passed as an argument (written in place), for several sequence lengths through one
binary, with the workspace given as an argument or allocated by the entry. Another entry takes
300 parameter arguments, as many as a 7B Llama has tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from llvm_cache import (
    TARGET,
    kernel_cache,  # noqa: F401  (pytest fixture)
    tensors,
)

from mlcc.backends.entry import EntryBuilder
from mlcc.backends.layouts import PagedKVSpec
from mlcc.backends.llvm import kernels as K
from mlcc.backends.llvm import linear as L
from mlcc.backends.llvm import paged_attention as A
from mlcc.errors import MlccError

VOCAB, HIDDEN, HQ, HKV, D, LAYERS, PAGES, BOUND = 40, 32, 2, 1, 16, 2, 4, 24
QKV = (HQ + 2 * HKV) * D
SPEC = PagedKVSpec(HKV, D, "float32", PAGES)
LAYER_BYTES = int(np.prod(SPEC.page_shape)) * 4


def build_entry(workspace: str) -> tuple[tvm.tirx.PrimFunc, dict]:
    eb = EntryBuilder(f"step_{workspace}", {"seq_len": BOUND}, workspace=workspace)
    tokens = eb.arg("tokens", ("seq_len",), "int32", role="tokens")
    info = eb.arg("seq_info", (2,), "int32", role="seq_info")
    table = eb.arg("page_table", (PAGES,), "int32", role="page_table")
    pool = eb.arg("kv_pool", (LAYERS,) + SPEC.page_shape, "float32", role="kv_cache")
    emb = eb.param("embed", (VOCAB, HIDDEN), "float32")
    norm = eb.param("norm", (HIDDEN,), "float32")
    proj = [eb.param(f"layers.{i}.qkv", (QKV, HIDDEN), "float32") for i in range(LAYERS)]
    out = eb.arg("qkv_out", ("seq_len", QKV), "float32", role="output")
    h = eb.temp("h", ("seq_len", HIDDEN), "float32", offset_bytes=0)
    x = eb.temp("x", ("seq_len", HIDDEN), "float32")
    eb.call(K.embedding("e_emb", "seq_len", VOCAB, HIDDEN, "float32"), [tokens, emb, h])
    eb.call(K.rms_norm("e_rms", "seq_len", HIDDEN, "float32", 1e-5), [h, norm, x])
    lin = L.linear("e_qkv", "seq_len", HIDDEN, QKV, "float32")
    append = A.kv_append("e_append", "seq_len", HQ, SPEC, "float32")
    for layer in range(LAYERS):
        pages = eb.view(pool, f"kv_pages_{layer}", SPEC.page_shape, "float32",
                        layer * LAYER_BYTES)
        eb.call(lin, [x, proj[layer], out])
        eb.call(append, [out, pages, table, info])
    return eb.finish(), eb.kernels


@pytest.fixture(scope="module")
def steps(kernel_cache):  # noqa: F811
    def make():
        funcs = {}
        for mode in ("arg", "alloc"):
            entry, kernels = build_entry(mode)
            funcs.update(kernels)
            funcs[entry.attrs["global_symbol"]] = entry
        return tvm.IRModule(funcs)
    return kernel_cache.get("entry_steps", make)


def reference(tokens, emb, norm, proj):
    h = emb[tokens]
    x = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * norm
    return [x @ w.T for w in proj]


@pytest.mark.parametrize("mode", ["arg", "alloc"])
def test_entry_runs_kernels_in_order_and_fills_the_pool_in_place(steps, mode):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    norm = rng.standard_normal(HIDDEN).astype(np.float32)
    proj = [rng.standard_normal((QKV, HIDDEN)).astype(np.float32) for _ in range(LAYERS)]
    table_np = np.array([2, 0, 3, 1], np.int32)
    pool = tensors(np.zeros((LAYERS,) + SPEC.page_shape, np.float32))[0]
    start = 0
    for n in (5, 1, 24, 3):  # one binary, four lengths; 33 positions span three pages
        ids = rng.integers(0, VOCAB, n).astype(np.int32)
        args = tensors(ids, np.array([start, 0], np.int32), table_np) + [pool] + tensors(
            emb, norm, *proj, np.zeros((n, QKV), np.float32))
        if mode == "arg":
            args += tensors(np.zeros(8192, np.uint8))
        steps[f"step_{mode}"](*args)
        expected = reference(ids, emb, norm, proj)
        np.testing.assert_allclose(args[-2 if mode == "arg" else -1].numpy(), expected[-1],
                                   rtol=1e-5, atol=1e-5)
        cache = pool.numpy()
        for layer in range(LAYERS):
            for i in range(n):
                slot = start + i
                row = cache[layer, table_np[slot // 16], :, :, slot % 16]
                np.testing.assert_allclose(row[0], expected[layer][i, HQ * D:(HQ + HKV) * D]
                                           .reshape(HKV, D), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(row[1], expected[layer][i, (HQ + HKV) * D:]
                                           .reshape(HKV, D), rtol=1e-5, atol=1e-5)
        start += n


def test_entry_rejects_lengths_above_the_bound_and_a_small_workspace(steps):
    n = BOUND + 1
    zeros = np.zeros
    base = tensors(zeros(n, np.int32), zeros(2, np.int32), np.arange(PAGES, dtype=np.int32),
                   zeros((LAYERS,) + SPEC.page_shape, np.float32),
                   zeros((VOCAB, HIDDEN), np.float32), zeros(HIDDEN, np.float32),
                   *[zeros((QKV, HIDDEN), np.float32)] * LAYERS, zeros((n, QKV), np.float32))
    with pytest.raises(ValueError, match="seq_len exceeds the compiled upper bound 24"):
        steps["step_alloc"](*base)
    ok = [tensors(zeros(1, np.int32))[0]] + base[1:-1] + tensors(zeros((1, QKV), np.float32))
    with pytest.raises(ValueError, match="the workspace must hold at least"):
        steps["step_arg"](*ok, *tensors(zeros(64, np.uint8)))


def test_signature_lists_roles_in_calling_order():
    entry, _ = build_entry("arg")
    import json
    sig = json.loads(str(entry.attrs["mlcc.signature"]))
    roles = [a["role"] for a in sig["args"]]
    assert roles[:4] == ["tokens", "seq_info", "page_table", "kv_cache"]
    assert roles[-2:] == ["output", "workspace"] and roles.count("param") == 2 + LAYERS
    assert sig["workspace_bytes"] == 2 * BOUND * HIDDEN * 4
    assert sig["kernels"] == ["e_emb", "e_rms", "e_qkv", "e_append"]


def test_three_hundred_parameter_arguments(kernel_cache):  # noqa: F811
    """out = x + every 10th of 300 weights of two dtypes, bound as unchecked tensor handles."""
    count, shape, used = 300, (4, 16), range(9, 300, 10)

    def make():
        eb = EntryBuilder("many")
        x = eb.arg("x", shape, "float32")
        weights = [eb.param(f"model.layers.{i}.w", shape, "float16" if i % 2 else "float32")
                   for i in range(count)]
        out = eb.arg("out", shape, "float32", role="output")
        acc = [eb.temp("acc0", shape, "float32"), eb.temp("acc1", shape, "float32")]
        widened = eb.temp("widened", shape, "float32")
        add = K.add("many_add", list(shape), "float32")
        widen = K.cast("many_widen", list(shape), "float16", "float32")
        eb.call(K.scale("many_copy", list(shape), "float32", 1.0), [x, acc[0]])
        for step, i in enumerate(used):
            if i % 2:
                eb.call(widen, [weights[i], widened])
            eb.call(add, [acc[step % 2], widened if i % 2 else weights[i], acc[1 - step % 2]])
        eb.call(K.scale("many_out", list(shape), "float32", 1.0), [acc[len(used) % 2], out])
        return [eb.finish(), *eb.kernels.values()]

    ex = kernel_cache.get("many", make)
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal(shape).astype("float16" if i % 2 else "float32")
          for i in range(count)]
    x = rng.standard_normal(shape).astype(np.float32)
    args = tensors(x, *ws, np.zeros(shape, np.float32), np.zeros(1024, np.uint8))
    ex["many"](*args)

    expected = x.copy()
    for i in used:
        expected = expected + ws[i].astype(np.float32)
    np.testing.assert_allclose(args[count + 1].numpy(), expected, rtol=1e-5, atol=1e-4)


def test_checked_parameters_reject_a_wrong_dtype(kernel_cache):  # noqa: F811
    def make():
        eb = EntryBuilder("checked", check_params=True)
        w = eb.param("w", (4,), "float32")
        out = eb.arg("out", (4,), "float32", role="output")
        eb.call(K.scale("checked_copy", [4], "float32", 2.0), [w, out])
        return [eb.finish(), *eb.kernels.values()]

    ex = kernel_cache.get("checked", make)
    w, out, ws = tensors(np.arange(4, dtype=np.float32), np.zeros(4, np.float32),
                         np.zeros(64, np.uint8))
    ex["checked"](w, out, ws)
    np.testing.assert_array_equal(out.numpy(), [0, 2, 4, 6])
    with pytest.raises(TypeError, match="dtype"):
        ex["checked"](*tensors(np.zeros(4, np.float16)), out, ws)


def test_build_time_checks_name_the_problem():
    eb = EntryBuilder("bad", {"seq_len": 4})
    x = eb.arg("x", ("seq_len", 8), "float16")
    out = eb.arg("out", ("seq_len", 8), "float32")
    with pytest.raises(MlccError, match=r"argument a expects float32\(seq_len, 8\), got x "
                                        r"float16\(seq_len, 8\)"):
        eb.call(K.add("b_add", ["seq_len", 8], "float32"), [x, x, out])
    with pytest.raises(MlccError, match="takes 3 arguments"):
        eb.call(K.add("b_add2", ["seq_len", 8], "float16"), [x, out])
    with pytest.raises(MlccError, match="multiples of 64"):
        eb.temp("t", (8,), "float32", offset_bytes=32)
    with pytest.raises(MlccError, match="without an upper bound"):
        eb.temp("u", ("other", 8), "float32")
    with pytest.raises(MlccError, match="declared twice"):
        eb.arg("x", (1,), "int32")
    eb2 = EntryBuilder("unbound", {"seq_len": 4, "other": 2})
    eb2.temp("t", ("other",), "float32")
    with pytest.raises(MlccError, match="symbol other appears in no argument shape"):
        eb2.finish()
    eb3 = EntryBuilder("dup")
    a = eb3.arg("a", (4,), "float32")
    eb3.call(K.scale("same", [4], "float32", 2.0), [a, a])
    with pytest.raises(MlccError, match="two different kernels are named same"):
        eb3.call(K.scale("same", [4], "float32", 3.0), [a, a])
    assert TARGET.kind.name == "llvm"
