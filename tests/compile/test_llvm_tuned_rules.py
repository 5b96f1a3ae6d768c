"""The tuned linear kernels plugged into the fused-op lowering as a kernel rule.

First per spec: the rule's text parses on its own (as the library text is split per function)
and computes x @ W^T. Then end to end: stories260K compiled by `mlcc compile` with the rule in
front of the portable kernels reproduces reference.json, and at q4f16_1 it agrees with the
library built from the portable kernels alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from llvm_cache import TARGET, assert_close, group_dequantize, group_quantize, tensors

from mlcc.backends.llvm import codegen
from mlcc.backends.llvm.tuned_rules import tuned_kernel, tuned_rule
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


def spec_of(op, rows, k, n, dt, quant=None, bias=False):
    x = ((rows, k), dt)
    out = ((rows, n), dt)
    if quant:
        bits, group = quant
        k_pad = -(-k // group) * group
        inputs = [x, ((n, k_pad // (32 // bits)), "uint32"), ((n, k_pad // group), dt)]
        attrs = (("bits", bits), ("group_size", group), ("in_features", k))
    else:
        inputs, attrs = [x, ((n, k), dt)], ()
    if bias:
        inputs.append(((n,), dt))
    return KernelSpec(op, tuple(inputs), (out,), attrs)


CASES = [("linear", Sym("seq_len"), None, True), ("linear", 1, None, False),
         ("q_linear", Sym("seq_len"), (4, 32), False), ("q_linear", 1, (4, 32), True),
         ("q_linear", 1, (3, 40), False)]


@pytest.mark.parametrize("op,rows,quant,bias", CASES)
def test_rule_text_parses_alone_and_matches_numpy(op, rows, quant, bias):
    spec = spec_of(op, rows, 172, 37, "float16", quant, bias)
    text = tuned_rule(spec, "k7_" + op, fast=True)
    assert tuned_rule(spec, "k7_" + op, fast=False) is None
    ex = tvm.compile(codegen.parse_functions(text), target=TARGET)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((37, 172)).astype(np.float32)
    if quant:
        q, s = group_quantize(w, *quant, "float16")
        w_args, w_ref = [q, s], group_dequantize(q, s, *quant, 172)
    else:
        w_args, w_ref = [w.astype(np.float16)], w.astype(np.float16).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float16)
    for n in ((1,) if rows == 1 else (1, 6)):
        x = rng.standard_normal((n, 172)).astype(np.float16)
        args = tensors(x, *w_args, *([b] if bias else []), np.zeros((n, 37), np.float16))
        ex["k7_" + op](*args)
        expected = x.astype(np.float32) @ w_ref.T + (b.astype(np.float32) if bias else 0)
        assert_close(args[-1].numpy(), expected, "float16", np.abs(expected).max())


def test_other_ops_are_left_to_the_portable_kernels():
    norm = KernelSpec("rms_norm", (((Sym("seq_len"), 64), "float32"), ((64,), "float32")),
                      (((Sym("seq_len"), 64), "float32"),), (("eps", 1e-5),))
    assert tuned_kernel(norm, "k0") is None
    batched = spec_of("linear", 4, 64, 32, "float32")
    assert tuned_kernel(batched, "k1") is not None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """stories260K libraries: tuned rule at q0f32 and q4f16_1, portable kernels at q4f16_1."""
    from mlcc.interface.compile import compile_model

    original = codegen.kernel_source
    root = tmp_path_factory.mktemp("tuned")
    out, used = {}, []

    def counted(spec, name, fast):
        text = tuned_rule(spec, name, fast)
        if text is not None:
            used.append(spec.op)
        return text

    for quant, tuned in (("q0f32", True), ("q4f16_1", True), ("q4f16_1", False)):
        path = root / f"{quant}_{'tuned' if tuned else 'portable'}.so"
        codegen.kernel_source = (lambda spec, name, fast, rules: original(
            spec, name, fast, [counted, *rules])) if tuned else original
        try:
            compile_model(STORIES, path, quantization=quant)
        finally:
            codegen.kernel_source = original
        out[(quant, tuned)] = path
    assert "linear" in used and "q_linear" in used
    return out


def engine(path: Path, quant: str, tmp_path: Path):
    from mlcc.frontend import resolve_model
    from mlcc.interface.convert_weight import convert_weight
    from mlcc.runtime_check.compiled import CompiledEngine

    params = tmp_path / f"params_{quant}"
    if not params.exists():
        convert_weight(STORIES, quantization=quant, output=params)
    assert resolve_model(STORIES).config.vocab_size == 512
    return CompiledEngine(path, params)


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models")
def test_stories_through_mlcc_compile_with_the_tuned_rule(compiled, tmp_path_factory):
    params_root = tmp_path_factory.mktemp("params")
    reference = json.loads((STORIES / "reference.json").read_text())
    tuned = engine(compiled[("q0f32", True)], "q0f32", params_root)
    for case in reference["cases"][:2]:
        ids = case["prompt_token_ids"]
        assert tuned.generate_greedy(ids, 24) == case["greedy_token_ids"][:24]
        top = case["first_step_top5"]
        logits = tuned.prefill_logits(ids)
        np.testing.assert_allclose(logits[top["ids"]], top["logits"], atol=1e-3)
    q4_tuned = engine(compiled[("q4f16_1", True)], "q4f16_1", params_root)
    q4_portable = engine(compiled[("q4f16_1", False)], "q4f16_1", params_root)
    ids = reference["cases"][0]["prompt_token_ids"]
    a, b = q4_tuned.prefill_logits(ids), q4_portable.prefill_logits(ids)
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(b).max())
    for token in (5, 99, 431):
        np.testing.assert_allclose(q4_tuned.decode(token), q4_portable.decode(token),
                                   atol=0.05 * np.abs(b).max())
