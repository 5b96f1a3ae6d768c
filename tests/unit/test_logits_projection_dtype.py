"""The output projection of a float16 model returns float32 logits straight from its sum.

linear/q_linear take `out_dtype`; the dtype pass sets out_dtype="float32" on the projection
that feeds the returned logits (and on nothing else), and the quantization and lm_head passes
keep it. Numbers are compared with torch's float32 linear on the same float16 values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from group_reference import reference_dequantize, reference_quantize
from tiny_model import VOCAB, build_tiny_llama, random_params

from mlcc import ir
from mlcc.ir.verify import VerifyError
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.layout import nbytes_upper
from mlcc.passes.quantize import QuantizeWeights

STORIES = Path(__file__).parents[2].parent / "shared" / "models" / "stories260K"
N, K, ROWS = 50, 96, 3


def single_op(op: str, inputs: list[np.ndarray], **attrs) -> tuple[ir.Module, np.ndarray]:
    """A module whose function `f` applies `op` to inputs; returns it and f's result."""
    mb = ir.ModuleBuilder("one_op")
    with mb.function("f") as b:
        values = [b.input(f"a{i}", a.shape, a.dtype.name) for i, a in enumerate(inputs)]
        b.output(b.emit(op, *values, **attrs))
    module = ir.verify(mb.finish())
    (result,) = ir.interpret(module, "f", inputs, {})
    return module, result


def float16_inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, K)).astype(np.float16)
    w = rng.standard_normal((N, K)).astype(np.float16)
    b = rng.standard_normal(N).astype(np.float16)
    return x, w, b


def torch_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.nn.functional.linear(*(torch.from_numpy(a.astype(np.float32))
                                        for a in (x, w, b))).numpy()


def test_linear_out_dtype_float32_returns_the_unrounded_sum():
    x, w, b = float16_inputs(0)
    want = torch_linear(x, w, b)
    module, got = single_op("linear", [x, w, b], out_dtype="float32")
    assert got.dtype == np.float32 and module.function("f").outputs[0].dtype == "float32"
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    # Without it the result is that sum rounded to float16, which these sums visibly are not.
    _, rounded = single_op("linear", [x, w, b])
    assert rounded.dtype == np.float16
    np.testing.assert_array_equal(rounded, want.astype(np.float16))
    assert np.abs(rounded.astype(np.float32) - want).max() > 1e-3


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 40)])
def test_q_linear_out_dtype_float32_matches_torch_on_dequantized_weights(bits, group):
    x, w, _ = float16_inputs(1)
    words, scales, _ = reference_quantize(w.astype(np.float32), bits, group, "float16")
    dense = reference_dequantize(w.astype(np.float32), bits, group, "float16")
    want = torch.nn.functional.linear(torch.from_numpy(x.astype(np.float32)),
                                      torch.from_numpy(dense)).numpy()
    _, got = single_op("q_linear", [x, words, scales], bits=bits, group_size=group,
                       in_features=K, out_dtype="float32")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bad", ["int32", "bfloat16"])
def test_out_dtype_must_be_a_float_dtype(bad):
    x, w, _ = float16_inputs(2)
    with pytest.raises(ir.TypeRuleError, match="out_dtype"):
        single_op("linear", [x, w], out_dtype=bad)


def projections(fn: ir.Function) -> list[ir.Node]:
    return [n for n in fn.nodes if n.op in ("linear", "q_linear")]


@pytest.mark.parametrize("quant", ["q0f16", "q4f16_1"])
def test_dtype_pass_marks_only_the_projection_feeding_the_logits(quant):
    module = build_tiny_llama()
    dtype = "float16"
    legal = run_passes(module, [ConvertModelDType(dtype), QuantizeWeights(quant)]).module
    ir.verify(legal)
    for fn in legal.functions:
        marked = [n for n in projections(fn) if n.attrs["out_dtype"] is not None]
        assert len(marked) == 1, (fn.name, marked)
        head = marked[0]
        assert head.attrs["out_dtype"] == "float32" and head.output.dtype == "float32"
        assert head.inputs[0].dtype == dtype
        assert "embed_tokens" in head.inputs[1].name  # the tied embedding is the head
        (reader,) = fn.users()[id(head.output)]
        assert reader.op == "last_logits"
        others = [v for n in fn.nodes if n is not head and n.op != "last_logits"
                  for v in n.outputs if isinstance(v.type, ir.TensorType)]
        assert all(v.dtype != "float32" for v in others), fn.name


def test_float32_models_are_left_alone():
    legal = run_passes(build_tiny_llama(), [ConvertModelDType("float32"),
                                            QuantizeWeights("q4f32_1")]).module
    for fn in legal.functions:
        assert all(n.attrs["out_dtype"] is None for n in projections(fn))


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_pipeline_keeps_float32_logits_and_the_interpreter_agrees(level):
    module = build_tiny_llama()
    params = random_params(module)
    plain = run_passes(module, [ConvertModelDType("float16"), QuantizeWeights("q0f16")]).module
    lowered = run_passes(module, build_pipeline(parse_opt(level), "float16", "q0f16", 8)).module
    head = [n for n in projections(lowered.function("prefill"))
            if n.attrs["out_dtype"] == "float32"]
    assert len(head) == 1
    if level == "O2":  # lm_head_last_row: the head runs on the last row only
        assert head[0].inputs[0].shape[0] == 1
    else:  # the memory plan gives the whole chunk's float32 logits 4 bytes each
        bounds = dict(lowered.attrs["symbol_bounds"])
        assert nbytes_upper(head[0].output.type, bounds) == bounds["seq_len"] * VOCAB * 4
    halves = {k: v.astype(np.float16) for k, v in params.items()}
    tokens = np.array([3, 17, 5, 9, 22], np.int32)
    want = ir.interpret(plain, "prefill", [tokens, ir.KVCacheState(
        plain.function("prefill").inputs[1].type)], halves)[0]
    got = ir.interpret(lowered, "prefill", [tokens, ir.KVCacheState(
        lowered.function("prefill").inputs[1].type)], halves)[0]
    assert want.dtype == got.dtype == np.float32
    # Logits are not float16 values: no rounding happened on the way out.
    assert np.any(want.astype(np.float16).astype(np.float32) != want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")
def test_batched_entry_projection_writes_float32_for_its_cast():
    from mlcc.frontend import resolve_model

    source = resolve_model(STORIES)
    module = source.arch.build_module(source.config.with_overrides(max_batch_size=4))
    legal = ir.verify(run_passes(module, [ConvertModelDType("float16"),
                                          QuantizeWeights("q4f16_1")]).module)
    fn = legal.function("batch_decode")
    (head,) = [n for n in projections(fn) if n.attrs["out_dtype"] is not None]
    (cast,) = fn.users()[id(head.output)]
    assert cast.op == "cast" and cast.output is fn.outputs[0]
    assert head.output.dtype == "float32"
    assert head.output.shape[1:] == (source.config.vocab_size,)


def test_verifier_requires_the_attribute_on_hand_built_nodes():
    fn = build_tiny_llama().function("decode")
    head = projections(fn)[-1]
    attrs = {k: v for k, v in head.attrs.items() if k != "out_dtype"}
    broken = fn.replace(nodes=tuple(ir.Node(n.op, n.inputs, n.outputs, attrs) if n is head
                                    else n for n in fn.nodes))
    with pytest.raises(VerifyError, match="out_dtype"):
        ir.verify(build_tiny_llama().with_function(broken))
