"""The per-kernel breakdown charges each kernel the time it adds to the stream, not its span."""

from __future__ import annotations

import pytest

from benchmarks.kernels import aggregate

SPECS = {"k1_q_linear": {"op": "q_linear", "inputs": [[[1, 64], "float16"], [[32, 8], "uint32"],
                                                        [[32, 2], "float16"]],
                         "outputs": [[[1, 32], "float16"]]},
         "k2_add_rms_norm": {"op": "add_rms_norm", "inputs": [[[1, 32], "float16"]],
                             "outputs": [[[1, 32], "float16"]]}}


def test_without_overlap_own_time_is_the_span_and_gaps_are_not_counted():
    events = [("k1_q_linear_kernel", 0.0, 10.0), ("k2_add_rms_norm_kernel", 12.0, 14.0),
              ("k1_q_linear_kernel", 20.0, 30.0), ("k2_add_rms_norm_kernel", 31.0, 33.0)]
    rows = {r["kernel"]: r for r in aggregate(events, 2, SPECS)}
    gemv, norm = rows["k1_q_linear_kernel"], rows["k2_add_rms_norm_kernel"]
    assert gemv["calls"] == 1 and gemv["us"] == pytest.approx(10.0) == gemv["span_us"]
    assert norm["us"] == pytest.approx(2.0) == norm["span_us"]
    per_call = 64 * 2 + 32 * 8 * 4 + 32 * 2 * 2 + 32 * 2
    assert gemv["bytes_per_call"] == per_call
    assert gemv["gb_s"] == pytest.approx(per_call / 10e-6 / 1e9)


def test_a_kernel_released_early_is_charged_from_the_end_of_the_one_ahead():
    # the norm starts at 3 (released by the GEMV) and waits until the GEMV ends at 10
    events = [("k2_add_rms_norm_kernel", 3.0, 12.0), ("k1_q_linear_kernel", 0.0, 10.0),
              ("Memcpy DtoH", 11.0, 11.5)]  # inside the norm's span: adds nothing
    rows = {r["kernel"]: r for r in aggregate(events, 1, SPECS)}
    assert rows["k2_add_rms_norm_kernel"]["span_us"] == pytest.approx(9.0)
    assert rows["k2_add_rms_norm_kernel"]["us"] == pytest.approx(2.0)
    assert rows["k1_q_linear_kernel"]["us"] == pytest.approx(10.0)
    assert rows["Memcpy DtoH"]["us"] == 0.0 and "gb_s" not in rows["Memcpy DtoH"]
    assert sum(r["us"] for r in rows.values()) == pytest.approx(12.0)  # the busy time
    assert aggregate(events, 1, SPECS)[0]["kernel"] == "k1_q_linear_kernel"  # slowest first


def test_prefill_rows_carry_no_bandwidth():
    rows = aggregate([("k1_q_linear_kernel", 0.0, 5.0)], 1, SPECS, "prefill")
    assert rows[0]["op"] == "q_linear" and "gb_s" not in rows[0]
