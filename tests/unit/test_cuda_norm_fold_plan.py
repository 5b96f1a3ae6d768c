"""Where the CUDA backend folds the decode add_rms_norm into the GEMVs around it
(mlcc.backends.cuda.norm_fold), on the plans the builder makes.

On the Llama-2-7B decode plan (after the GLU fusion) every add_rms_norm goes: 32 in front of
the GLU GEMV, 31 in front of the next layer's qkv GEMV and the final one in front of the
logits; the embedding's rms_norm stays. Each fold reads what the three calls read, writes the
residual sum where the norm wrote it, and keeps its partial sums in the bytes of the GEMV
result the norm read, which no other buffer of the two calls touches (the memory plan keeps
that result alive through the fused consumer). Prefill, GEMVs the rules give to another kernel,
float16-dot consumers and a normalized row with another reader stay as they were; the
`fold_norms` knob (opt-in) reaches the builder; the tiny models of the GPU parity cases fold
under the database those cases force. Kernel text is generated (no TVM build).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_cuda_glu_plan import lowered, plans, tiny_config

from mlcc.backends.cuda import codegen, glu, norm_fold
from mlcc.backends.plan import KernelCall, KernelSpec, workspace_range, writes_over_inputs
from mlcc.passes import parse_opt

TESTS = Path(__file__).resolve().parents[1]


def ops(plan) -> Counter:
    return Counter(c.spec.op for c in plan.calls)


def test_every_decode_add_rms_norm_folds(decode7b):
    folded = norm_fold.fold_norms(decode7b)
    counts = ops(folded)
    assert counts["add_rms_norm"] == 0 and counts["rms_norm"] == 1
    assert counts[norm_fold.PRODUCER] == 64
    assert counts["rms_linear_silu_mul"] == 32 and counts["rms_q_linear"] == 32
    assert len(folded.calls) == len(decode7b.calls) - 64


def test_folded_calls_read_and_write_what_the_three_did(decode7b):
    bounds = dict(decode7b.bounds)
    old, new = decode7b.calls, norm_fold.fold_norms(decode7b).calls
    j = 0
    for i, call in enumerate(old):
        if call.spec.op != "add_rms_norm":
            continue
        first, second = old[i - 1], old[i + 1]
        while new[j].spec.op != norm_fold.PRODUCER:
            j += 1
        produce, consume = new[j], new[j + 1]
        result = first.buffers[3]
        residual = call.buffers[0] if call.buffers[1] == result else call.buffers[1]
        assert produce.buffers[:3] == first.buffers[:3]  # x, codes, scales
        assert produce.buffers[3] == residual and produce.buffers[4] == call.buffers[4]
        ssq = produce.buffers[5]
        assert ssq.offset == result.offset and ssq.dtype == "float32"
        assert ssq.shape == (1, norm_fold.producer_parts(first.spec))
        assert consume.buffers[:3] == [call.buffers[4], ssq, call.buffers[2]]
        assert consume.buffers[3:] == second.buffers[1:]
        assert consume.spec.op == "rms_" + second.spec.op
        lo, hi = workspace_range(ssq, bounds)
        for buf in produce.buffers + consume.buffers:
            span = workspace_range(buf, bounds)
            assert buf == ssq or span is None or span[1] <= lo or hi <= span[0]
        assert not writes_over_inputs(produce, bounds) and not writes_over_inputs(consume,
                                                                                  bounds)
        j += 2


def test_kernels_of_the_folded_7b_plan_generate(decode7b):
    folded = norm_fold.fold_norms(decode7b)
    specs = {c.spec for c in folded.calls if c.spec.op in norm_fold.GENERATORS}
    assert len(specs) == 5  # producers: o_proj, down; consumers: GLU, qkv, logits
    for spec in specs:
        source = codegen.kernel_for(spec, "k").device_source
        if spec.op == norm_fold.PRODUCER:
            assert "sum_out[r * 4096LL + n] = sum;" in source and "ssq[r * 256LL" in source
        else:
            assert "ssq_v[8]" in source and "first_w[j]" in source


def test_prefill_does_not_fold(llama7b):
    prefill = glu.fuse_glu(plans(llama7b)["prefill"])
    assert ops(norm_fold.fold_norms(prefill)) == ops(prefill)


def test_no_fold_when_another_call_reads_the_normalized_row(decode7b):
    calls = list(decode7b.calls)
    at = next(i for i, c in enumerate(calls) if c.spec.op == "add_rms_norm")
    normed = calls[at].buffers[3]
    reader = KernelCall(KernelSpec("scale", ((normed.shape, "float16"),),
                                   ((normed.shape, "float16"),), (("factor", 2.0),)),
                        [normed, dataclasses.replace(normed, name="copy")])
    calls.insert(at + 2, reader)  # after the GEMV that reads it
    folded = norm_fold.fold_norms(dataclasses.replace(decode7b, calls=calls))
    assert ops(folded)["add_rms_norm"] == 1 and ops(folded)[norm_fold.PRODUCER] == 63


def test_no_fold_around_gemvs_without_the_integer_dot(tmp_path):
    """The tiny models' shapes are not in the database: the heuristic's float16 dot."""
    module = lowered(tiny_config(tmp_path, "llama"), "q4f16_1", "prefill_chunk_size=4")
    decode = glu.fuse_glu(plans(module)["decode"])
    assert ops(norm_fold.fold_norms(decode))[norm_fold.PRODUCER] == 0


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_gpu_parity_fold_cases_fold(tmp_path, name):
    sys.path.insert(0, str(TESTS / "gpu"))
    try:
        from cuda_cases import CASES, case_database
    finally:
        sys.path.remove(str(TESTS / "gpu"))
    case = f"{name}_q4f16_1_fold_dp2a_block"
    assert (case, name, "q4f16_1", "O2;fold_norms=1") in CASES
    module = lowered(tiny_config(tmp_path, name), "q4f16_1", "prefill_chunk_size=4")
    with case_database(case):
        decode = norm_fold.fold_norms(glu.fuse_glu(plans(module)["decode"]))
        assert ops(decode)[norm_fold.PRODUCER] == 4 and ops(decode)["add_rms_norm"] == 0
        for spec in {c.spec for c in decode.calls}:
            codegen.kernel_for(spec, "k")


def test_knob_reaches_the_cuda_builder(monkeypatch, llama7b):
    from mlcc.backends import build_model_library

    seen = []
    monkeypatch.setattr(codegen, "build",
                        lambda *args, **kwargs: seen.append(kwargs["fold_norms"]) or {})
    for opt in ("O2", "O3", "O2;fold_norms=1", "O0;fold_norms=1", None):
        build_model_library(llama7b, Path("x.so"), {}, device="cuda",
                            opt=None if opt is None else parse_opt(opt))
    assert seen == [False, False, True, True, False]


def test_memory_plan_keeps_the_fold_bytes_in_decode_only(monkeypatch, llama7b):
    """The liveness the fold needs (mlcc.passes.layout.STATIC_PAIRS and the norms' longer
    lives) applies where rows are static: the decode workspace grows, the prefill one (rows up
    to the chunk) is what it would be without it."""
    from mlcc.passes import layout

    with_fold = {fn.name: fn.attrs["workspace_bytes"] for fn in llama7b.functions}
    monkeypatch.setattr(layout, "STATIC_PAIRS", frozenset())
    monkeypatch.setattr(layout, "_folds", lambda node: False)
    without = lowered("llama2_7b", "q4f16_1")
    plain = {fn.name: fn.attrs["workspace_bytes"] for fn in without.functions}
    assert with_fold["prefill"] == plain["prefill"]
    assert with_fold["decode"] > plain["decode"]
    decode = glu.fuse_glu(plans(without)["decode"])
    assert ops(norm_fold.fold_norms(decode))[norm_fold.PRODUCER] < 64  # the bytes it needs
