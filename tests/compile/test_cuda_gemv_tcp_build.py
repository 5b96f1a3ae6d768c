"""nvcc compiles the persistent tensor-core GEMV for the Llama-2-7B decode shapes without spills;
the sweep's `tcp` set generates, and the rule stays off until the database records the kind.

Each kernel is wrapped in a __global__ function bounded by its launch's threads (as TVM's
launchers are) and compiled for sm_90 with ptxas' resource report (registers are printed).
"""

from __future__ import annotations

import shutil

import pytest
from test_cuda_gemv_persistent import merged_database, q_linear_spec, sweep_module
from test_cuda_gemv_tc_build import global_wrapper, resources

from mlcc.backends.cuda import gemv_tc, gemv_tcp, tuning
from mlcc.backends.cuda.kernels import COMMON_SOURCE
from mlcc.backends.cuda.linear import LINEAR_RULES, LinearShape

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_7b_decode_tcp_kernels_compile_without_spills(tmp_path):
    sweep = sweep_module()
    parts, launches = ["#include <cstdint>\ntypedef unsigned int uint;", COMMON_SOURCE], {}
    configs = sorted({gemv_tcp.TcpConfig(*c) for c in sweep.TCP_CONFIGS}
                     | {gemv_tcp.TcpConfig()}, key=lambda c: c.tag)
    for n, k in SHAPES:
        s = LinearShape(q_linear_spec(1, n, k, ydt="float32" if n == 32000 else "float16"))
        for c in configs:
            name = f"tcp_{n}_{k}_{c.tag}"
            kernel = gemv_tcp.gemv_q4_tcp_kernel(s, name, c)
            assert "lop3" not in kernel.device_source or "MLCC_LOP3_OR" in kernel.device_source
            parts.append(kernel.device_source + global_wrapper(s, name, 32 * c.warps))
            launches[f"{name}_g"] = c
    report = resources("\n".join(parts), tmp_path)
    assert sorted(report) == sorted(launches)
    bad = []
    for name, (regs, stores, loads, smem) in sorted(report.items()):
        c = launches[name]
        resident = min(c.blocks_per_sm, 65536 // (regs * 32 * c.warps))
        print(f"{name:40s} {regs:4d} registers {stores:3d} B spilled {smem:6d} B shared, "
              f"{resident} of {c.blocks_per_sm} blocks resident per SM")
        if stores or loads or smem > 48 * 1024:
            bad.append(name)
    assert not bad


def test_tcp_rule_is_off_without_a_tcp_record_and_on_with_one(monkeypatch):
    spec = q_linear_spec(1, 22016, 4096)
    assert gemv_tcp.gemv_q4_tcp_rule in LINEAR_RULES
    tc_at = LINEAR_RULES.index(gemv_tc.gemv_q4_tc_rule)
    assert LINEAR_RULES.index(gemv_tcp.gemv_q4_tcp_rule) == tc_at + 1  # right after it
    for n, k in SHAPES:  # the shipped database has no tcp record
        assert tuning.tcp_config(n, k) is None
        assert gemv_tcp.gemv_q4_tcp_rule(q_linear_spec(1, n, k), "k") is None
    record = {"kind": "tcp", "blocks_per_sm": 4, "warps": 4, "depth": 3, "us": 1.0}
    db = {"best": {"22016,4096": record}, "best_by_kind": {"tcp": {"22016,4096": record}}}
    monkeypatch.setattr(tuning, "_database", lambda: db)
    assert tuning.tcp_config(22016, 4096) == (4, 4, 3)
    kernel = gemv_tcp.gemv_q4_tcp_rule(spec, "k")
    assert kernel is not None and "mlcc_tcp_dequant" in kernel.device_source
    # 1376 tiles of 16 features: 4 x 132 blocks of 4 warps would idle some, so 344 blocks
    assert "T.int64(344)" in kernel.launcher and "lt += 1376;" in kernel.device_source
    assert gemv_tcp.gemv_q4_tcp_rule(q_linear_spec(1, 4096, 4096), "k") is None
    assert gemv_tcp.gemv_q4_tcp_rule(q_linear_spec(9, 22016, 4096), "k") is None


def test_sweep_tcp_set_generates_and_merge_keeps_tcp_records(tmp_path):
    sweep = sweep_module()
    chosen = sweep.tcp_variants()
    assert len({v["name"] for v in chosen}) == len(chosen)
    tcp = [v for v in chosen if v["kind"] == "tcp"]
    assert {(v["n"], v["k"]) for v in tcp if v["rows"] == 1} >= set(SHAPES)
    assert {v["rows"] for v in tcp} == {1, 3} and any(v["n"] % 16 for v in tcp)
    for v in chosen:
        kernel = sweep.kernel_of(v)
        assert kernel.name == v["name"]
        assert ("mlcc_tcp_dequant" in kernel.device_source) == (v["kind"] == "tcp")
    picks = [v for v in chosen if v["kind"] != "tcp"]
    assert len(picks) == len(SHAPES)
    # the shipped database's pick for each shape (today the one-shot kernel for all five)
    assert [v["kind"] for v in picks] == [tuning.selected_kind(n, k) for n, k in SHAPES]
    rows = [dict(v, us=10.0 - i, gb_s=1.0, rel_err=1e-4) for i, v in enumerate(chosen)]
    merged = merged_database(sweep, rows, tmp_path)
    for n, k in SHAPES:
        assert merged["best"][f"{n},{k}"]["kind"] == "tcp"
        assert merged["best_by_kind"]["tcp"][f"{n},{k}"]["depth"] in (2, 3)
    assert "1001,4096" not in merged["best"]  # validation-only shapes are never recorded
