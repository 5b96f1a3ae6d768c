"""The tensor-core GEMV wired into the CUDA linear rules builds the 7B decode and batch decode.

With gemv_q4_tc_rule placed first in mlcc.backends.cuda.linear's LINEAR_RULES (patched here; the
rule declines by itself where it should not run) and a GEMV database naming it fastest at one
row, every q_linear of Llama-2-7B's decode and batch_decode (max_batch_size 16, the batch
symbol) gets it, prefill keeps the GEMM (but for its last row's logits), the logits keep
float32, and the whole library's device source with those kernels under TVM-style __global__
wrappers compiles with nvcc for sm_90 without spills.
"""

from __future__ import annotations

import re
import shutil
from unittest import mock

import pytest
from test_cuda_gemv_tc_build import global_wrapper, resources

from mlcc.backends.cuda import linear, tuning
from mlcc.backends.cuda.codegen import device_source, library_parts
from mlcc.backends.cuda.gemv_tc import gemv_q4_tc_rule
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import CCL_FUNCTIONS
from mlcc.interface.compile import load_model_config
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
TC_MARK = "mlcc_tcv_mma(acc"


def lowered_7b(batch: int):
    arch, config, quant, _ = load_model_config("llama2_7b", "q4f16_1", None)
    config = config.with_overrides(max_batch_size=batch)
    passes = build_pipeline(parse_opt("O2"), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    return run_passes(arch.build_module(config), passes).module


def test_rule_first_in_linear_rules_builds_decode_and_batch_decode(tmp_path):
    database = {"best": {f"{n},{k}": {"kind": "tc", "warps": 8, "tiles": 1, "unroll": 2}
                         for n, k in SHAPES}}
    with mock.patch.object(linear, "LINEAR_RULES", (gemv_q4_tc_rule,) + linear.LINEAR_RULES), \
            mock.patch.object(tuning, "_database", lambda: database):
        built, plans, _, _ = library_parts(lowered_7b(16), {"params": []})
    assert {p.name for p in plans} == {"prefill", "decode", "batch_decode"}
    by_name = {k.name: k for k in built}
    names: dict = {}  # library_parts' naming: k<i>_<op> in order of first use
    for plan in plans:
        for call in plan.calls:
            if call.spec.op not in CCL_FUNCTIONS:
                names.setdefault(call.spec, f"k{len(names)}_{call.spec.op}")
    per_entry = {p.name: {names[c.spec] for c in p.calls if c.spec.op == "q_linear"}
                 for p in plans}
    for entry in ("decode", "batch_decode"):
        assert len(per_entry[entry]) == 5
        assert all(TC_MARK in by_name[k].device_source for k in per_entry[entry]), entry
    # prefill: the chunk's linears keep the GEMM; the logits of its last row are decode's
    for call in next(p for p in plans if p.name == "prefill").calls:
        if call.spec.op == "q_linear":
            rows = call.spec.inputs[0][0][0]
            assert (TC_MARK in by_name[names[call.spec]].device_source) == (rows == 1), rows
    batch = [by_name[k] for k in per_entry["batch_decode"]]
    assert all("blockIdx.y" in k.launcher and "batch" in k.launcher for k in batch)
    assert any("float* __restrict__ y" in k.device_source for k in batch)  # the logits
    # every tensor-core GEMV under a __global__ wrapper, so nvcc compiles its code for sm_90
    tc = sorted({k for entry in ("decode", "batch_decode") for k in per_entry[entry]})
    specs = {name: spec for spec, name in names.items()}
    wrappers = "".join(global_wrapper(LinearShape(specs[k]), k, tc_threads(by_name[k]))
                       for k in tc)
    source = "#include <cstdint>\ntypedef unsigned int uint;\n" + device_source(built) + wrappers
    report = resources(source, tmp_path)
    assert sorted(report) == sorted(f"{k}_g" for k in tc)
    assert all(stores == 0 and loads == 0 for _, stores, loads, _ in report.values()), report


def tc_threads(kernel) -> int:
    found = re.search(r'T\.thread_binding\((\d+), thread="threadIdx\.x"\)', kernel.launcher)
    return int(found.group(1))
