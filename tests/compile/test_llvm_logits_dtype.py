"""float32 logits from float16 activations: the CPU linear kernels with out_dtype="float32".

A float16 model's output projection writes its float32 sum unrounded (the dtype pass sets
out_dtype="float32" on it). Each CPU kernel that can run that projection, the tuned rules
(GEMV-BYTES, GEMV, GEMM) and the portable kernel, is compared with a NumPy float32 product. The
expected values are checked to be far from their float16 rounding at the tolerance used, so a
kernel that rounds through float16 fails. Then stories260K compiled at q0f16 and q4f16_1 returns
logits that are not float16 values, close to ReferenceModel's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from llvm_cache import TARGET, group_dequantize, group_quantize, tensors

from mlcc.backends.llvm import codegen
from mlcc.backends.llvm.fallback import gen_linear
from mlcc.backends.llvm.tuned_rules import tuned_rule
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym
from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.reference import ReferenceModel

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"

K, N = 172, 37
TOLERANCE = 2e-5  # of the result's largest magnitude: float32 sums in another order


def spec_of(op: str, rows, quant, bias: bool) -> KernelSpec:
    x = ((rows, K), "float16")
    if quant:
        bits, group = quant
        k_pad = -(-K // group) * group
        inputs = [x, ((N, k_pad // (32 // bits)), "uint32"), ((N, k_pad // group), "float16")]
        attrs = (("bits", bits), ("group_size", group), ("in_features", K),
                 ("out_dtype", "float32"))
    else:
        inputs, attrs = [x, ((N, K), "float16")], (("out_dtype", "float32"),)
    if bias:
        inputs.append(((N,), "float16"))
    return KernelSpec(op, tuple(inputs), (((rows, N), "float32"),), attrs)


def weights(quant, rng) -> tuple[list[np.ndarray], np.ndarray]:
    """Kernel weight arguments and the float32 weight they stand for."""
    w = rng.standard_normal((N, K)).astype(np.float32)
    if quant:
        q, s = group_quantize(w, *quant, "float16")
        return [q, s], group_dequantize(q, s, *quant, K)
    return [w.astype(np.float16)], w.astype(np.float16).astype(np.float32)


def run_kernel(text: str, name: str, args: list[np.ndarray], rows: int) -> np.ndarray:
    ex = tvm.compile(codegen.parse_functions(text), target=TARGET)
    buffers = tensors(*args, np.zeros((rows, N), np.float32))
    ex[name](*buffers)
    return buffers[-1].numpy()


def check(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32
    atol = TOLERANCE * np.abs(expected).max()
    # Rounding through float16 moves these sums by far more than the tolerance.
    assert np.abs(expected.astype(np.float16).astype(np.float32) - expected).max() > 4 * atol
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


# (op, rows of the spec, quantization): GEMV-BYTES (4 and 8 bits), GEMV (plain and 3-bit),
# GEMM, GEMM plain
CASES = [("q_linear", 1, (4, 32)), ("q_linear", 1, (8, 32)), ("q_linear", 1, (3, 40)),
         ("linear", 1, None),
         ("q_linear", Sym("seq_len"), (4, 32)), ("linear", Sym("seq_len"), None)]


@pytest.mark.parametrize("op,rows,quant", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_tuned_kernels_write_the_float32_sum(op, rows, quant, bias):
    rng = np.random.default_rng(11)
    w_args, w_ref = weights(quant, rng)
    b = rng.standard_normal(N).astype(np.float16)
    spec = spec_of(op, rows, quant, bias)
    name = f"tuned_{op}"
    text = tuned_rule(spec, name, fast=True)
    assert text is not None, "a float32 result must not fall back to the portable kernel"
    for n in ((1,) if rows == 1 else (1, 6)):
        x = rng.standard_normal((n, K)).astype(np.float16)
        got = run_kernel(text, name, [x, *w_args, *([b] if bias else [])], n)
        expected = x.astype(np.float32) @ w_ref.T + (b.astype(np.float32) if bias else 0)
        check(got, expected)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("op,quant", [("q_linear", (4, 32)), ("linear", None)])
def test_portable_kernel_writes_the_float32_sum(op, quant, fast):
    rng = np.random.default_rng(12)
    w_args, w_ref = weights(quant, rng)
    # The portable kernel rounds a dequantized weight through the scale dtype, as the IR
    # reference does.
    w_ref = w_ref.astype(np.float16).astype(np.float32)
    name = f"portable_{op}"
    text = gen_linear(spec_of(op, Sym("seq_len"), quant, False), name, fast)
    x = rng.standard_normal((5, K)).astype(np.float16)
    check(run_kernel(text, name, [x, *w_args], 5), x.astype(np.float32) @ w_ref.T)


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")
@pytest.mark.parametrize("opt", ["O0", "O2"])
@pytest.mark.parametrize("quantization", ["q0f16", "q4f16_1"])
def test_compiled_float16_model_returns_float32_logits(libraries, quantization, opt):
    reference = ReferenceModel(STORIES, quantization)
    engine = CompiledEngine(libraries.get(STORIES, quantization, opt), reference.params)
    case = json.loads((STORIES / "reference.json").read_text())["cases"][0]
    ids, follow = case["prompt_token_ids"], case["greedy_token_ids"][:4]
    want = [reference.prefill_logits(ids)] + [reference.decode(t) for t in follow]
    got = [engine.prefill_logits(ids)] + [engine.decode(t) for t in follow]
    for step, (a, b) in enumerate(zip(want, got)):
        assert b.dtype == np.float32
        # float16 logits would all be float16 values; float32 sums almost never are.
        assert np.mean(b.astype(np.float16).astype(np.float32) != b) > 0.9, step
        # Both round activations to float16, in different summation orders: a few float16
        # steps of the logits (0.0078 at 8..16) apart, as the q4f16_1 test of
        # test_llvm_stories.py allows.
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-2, err_msg=f"step {step}")
