"""CUDA kernels of the sparse mixture of experts, built here without a GPU.

Every kernel of a tiny Mixtral compiles with nvcc for sm_90 in each mode; decode's grouped
linears are GEMVs with one grid row per slot that read one expert's weights, prefill's are
grouped GEMMs whose blocks leave at once past their expert's slots; no dense projection reads
an expert's weights; the routing needs no host copy (no kernel argument is a host value that
depends on the routing). Numbers are checked on the GPU (tests/gpu/test_moe_cuda.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from mlcc.backends.cuda import moe
from mlcc.backends.cuda.codegen import device_source, library_parts
from mlcc.frontend.mixtral import MixtralConfig, build_mixtral
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_cuda_codegen import nvcc
from test_passes_moe import TINY

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def lowered_mixtral(quantization: str, batch: int = 1, **sizes):
    config = MixtralConfig.from_hf({**TINY, "max_batch_size": batch, **sizes})
    passes = build_pipeline(parse_opt("O2"), get_scheme(quantization).model_dtype, quantization,
                            config.prefill_chunk_size)
    return run_passes(build_mixtral(config), passes).module


@pytest.mark.parametrize("quantization", ["q0f32", "q0f16", "q4f16_1", "q3f16_1"])
def test_mixtral_kernels_compile_with_nvcc(tmp_path, quantization):
    built, plans, _, _ = library_parts(lowered_mixtral(quantization, batch=4), {"params": []})
    ops = {k.name.split("_", 1)[1] for k in built}
    grouped = "moe_linear" if quantization.startswith("q0") else "q_moe_linear"
    assert {"moe_route", "moe_dispatch", grouped, "moe_reduce"} <= ops
    assert "moe_combine" not in ops
    done = nvcc(device_source(built), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for plan in plans:
        for call in plan.calls:
            if call.spec.op in ("linear", "q_linear"):
                assert not [b for b in call.buffers if ".experts." in b.name], call.spec


def test_decode_gathers_one_expert_per_slot_and_prefill_groups_rows():
    module = lowered_mixtral("q4f16_1")
    _, plans, _, _ = library_parts(module, {"params": []})
    by_entry = {plan.name: {call.spec for call in plan.calls if call.spec.op == "q_moe_linear"}
                for plan in plans}
    decode = [moe.gen_moe_linear(spec, "k") for spec in by_entry["decode"]]
    prefill = [moe.gen_moe_linear(spec, "k") for spec in by_entry["prefill"]]
    assert len(decode) == len(prefill) == 2  # gate/up and down, shared by both layers
    for kernel in decode:
        # one grid row per slot (top_k = 2 for one token), the expert found on the device
        assert 'T.thread_binding(T.int64(2), thread="blockIdx.y")' in kernel.launcher
        assert "p >= offsets[e + 1]" in kernel.device_source
        assert "if (slot_rows[p] < 0)" in kernel.device_source
    for kernel in prefill:
        # experts x row tiles; a tile past its expert's slots returns before reading weights
        assert "T.int64(5)" in kernel.launcher and "seq_len" in kernel.launcher
        body = kernel.device_source
        assert body.index("if (start >= end) return 0;") < body.index("qwe[")


@pytest.mark.slow
def test_mixtral_cuda_library_builds(tmp_path):
    from mlcc.backends.cuda.codegen import build

    module = lowered_mixtral("q4f16_1")
    counts = build(module, tmp_path / "lib.so", {"model_type": "mixtral"})
    assert counts["q_moe_linear"] == 4 and counts["moe_dispatch"] == 2
    assert (tmp_path / "lib.so").stat().st_size > 0


def test_four_bit_decode_reads_whole_groups_with_128_bit_loads(tmp_path):
    """K a multiple of 32 (hidden 64, intermediate 96): the nibble-pair GEMV of the dense path."""
    module = lowered_mixtral("q4f16_1", hidden_size=64, intermediate_size=96,
                             num_attention_heads=8)
    built, plans, _, _ = library_parts(module, {"params": []})
    decode = {call.spec for plan in plans if plan.name == "decode" for call in plan.calls
              if call.spec.op == "q_moe_linear"}
    assert len(decode) == 2
    for spec in decode:
        source = moe.gen_moe_linear(spec, "k").device_source
        assert "mlcc_q4_dot8(w.x, xg)" in source and "__ldg(row + gi)" in source
    done = nvcc(device_source(built), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
