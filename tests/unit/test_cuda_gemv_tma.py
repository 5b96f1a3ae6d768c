"""Where the opt-in TMA GEMV (mlcc.backends.cuda.gemv_tma, knob `tma_gemv`) replaces a decode
GEMV, and what its text and launch carry.

On the Llama-2-7B decode plan it takes the one-row q4 GEMVs whose slice fits a block's shared
memory: qkv, o_proj and down in every layer, not the output projection (32000 rows) nor the
fused gate_up + silu_mul; prefill, batch decode and models whose scale rows are not whole
16-byte units keep their kernels (the tiny GPU-test models at K = 256 run it everywhere).
The kernel's values were checked on an H200 against a float32 reference and against the
shipped library (benchmarks/results/2026-11-30-h200-c); here one build compiles the three 7B
kernels with nvcc.
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from test_cuda_glu_plan import lowered, plans, tiny_config

from mlcc.backends.cuda import codegen, gemv_tma
from mlcc.backends.cuda.linear import LinearShape
from mlcc.passes import parse_opt

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def marked(plan) -> Counter:
    return Counter(LinearShape(c.spec).yshape[1] for c in plan.calls
                   if dict(c.spec.attrs).get(gemv_tma.ATTR))


def test_the_7b_decode_gemvs_that_fit_are_marked(decode7b):
    assert marked(gemv_tma.mark(decode7b)) == {12288: 32, 4096: 64}  # qkv; o_proj and down
    module = lowered("llama2_7b", "q4f16_1", "max_batch_size=4")
    others = {name: plan for name, plan in plans(module).items() if name != "decode"}
    assert set(others) == {"prefill", "batch_decode"}
    assert not any(marked(gemv_tma.mark(plan)) for plan in others.values())
    again = gemv_tma.mark(gemv_tma.mark(decode7b))
    assert all(len([a for a in c.spec.attrs if a[0] == gemv_tma.ATTR]) <= 1 for c in again.calls)


def test_slices_fit_one_block_an_sm(decode7b):
    for call in gemv_tma.mark(decode7b).calls:
        if not dict(call.spec.attrs).get(gemv_tma.ATTR):
            continue
        s = LinearShape(call.spec)
        lay = gemv_tma.layout(s, gemv_tma.default_config(s.k))
        assert gemv_tma.ONE_PER_SM <= lay.total <= gemv_tma.MAX_SMEM
        assert -(-s.n // lay.rows) <= 132
        assert lay.weights == 0 and lay.scales % 16 == 0 and lay.bars % 8 == 0
    assert gemv_tma.default_config(4096) == gemv_tma.TmaConfig(1, 8, 16)
    assert gemv_tma.default_config(11008) == gemv_tma.TmaConfig(4, 2, 8)


def test_the_kernel_copies_before_its_wait_and_stages_after(decode7b):
    call = next(c for c in gemv_tma.mark(decode7b).calls if dict(c.spec.attrs).get(gemv_tma.ATTR))
    kernel = gemv_tma.gemv_tma_rule(call.spec, "k1_q_linear")
    lay = gemv_tma.layout(LinearShape(call.spec), gemv_tma.default_config(4096))
    assert kernel.min_blocks == 1
    assert f'T.alloc_buffer(({lay.total},), "uint8", scope="shared.dyn")' in kernel.launcher
    assert "smem.data))" in kernel.launcher
    body = kernel.device_source[kernel.device_source.index("k1_q_linear_dev("):]
    assert body.index("mbarrier.init") < body.index("mlcc_chain_copy(") \
        < body.index("mlcc_grid_wait();") < body.index("xg[gi] =") < body.index("mlcc_chain_wait(")


def test_small_models_run_it_where_scale_rows_are_whole_units(tmp_path):
    """K = 64 or 96 (the tiny GPU-test models): a row's scales are 4 or 6 bytes, not a whole
    16-byte unit a bulk copy can move, so they keep their GEMVs; K = 256 (llama64) does not."""
    def tma_kernels(name: str) -> list[str]:
        module = lowered(tiny_config(tmp_path, name), "q4f16_1", "prefill_chunk_size=128")
        built, _, _, _ = codegen.library_parts(module, {}, fuse_glu=True, tma_gemv=True)
        return [k.name for k in built if "mbarrier.init" in k.device_source]

    assert tma_kernels("llama") == []
    # qkv (512 x 256), o_proj and down (one 256 x 256 spec), the logits (decode and prefill's
    # last row)
    assert len(tma_kernels("llama64")) == 3
    assert parse_opt("O3").enabled("tma_gemv") is False
    assert parse_opt("O2;tma_gemv=1").enabled("tma_gemv") is True


def test_below_sm_90_the_builder_turns_it_off(tmp_path, monkeypatch):
    module = lowered(tiny_config(tmp_path, "llama64"), "q4f16_1", "prefill_chunk_size=128")
    monkeypatch.setattr(codegen, "compile_library", lambda *args, **kwargs: None)
    logs: list[str] = []
    codegen.build(module, tmp_path / "lib.so", {}, archs=("sm_80",), log=logs.append,
                  fuse_glu=True, tma_gemv=True)
    assert any(line.startswith("tma_gemv off") and "sm_80" in line for line in logs)


@needs_nvcc
def test_the_three_7b_kernels_compile(tmp_path, decode7b):
    specs = {c.spec for c in gemv_tma.mark(decode7b).calls
             if dict(c.spec.attrs).get(gemv_tma.ATTR)}
    kernels = [gemv_tma.gemv_tma_rule(spec, f"k{i}_q_linear") for i, spec in enumerate(specs)]
    probe = gemv_tma.gemv_tma_kernel(LinearShape(next(iter(specs))), "probe",
                                     gemv_tma.TmaConfig(stream_only=True))
    # with a producer warp: 2 (K = 4096) or 4 K slices, chunks of 4 features, 4 in flight
    depth = []
    for i, spec in enumerate(specs):
        ks = 2 if LinearShape(spec).k == 4096 else 4
        cfg = gemv_tma.TmaConfig(ks, 8 // ks, 4, depth=4)
        depth.append(gemv_tma.gemv_tma_kernel(LinearShape(spec), f"d{i}", cfg))
    codegen.compile_library(kernels + [probe] + depth, "", "", tmp_path / "tma.so")
    assert (tmp_path / "tma.so").stat().st_size > 0


def test_a_producer_warp_keeps_depth_chunks_in_flight(decode7b):
    """With depth, an extra warp issues the copies (chunk c after chunk c - depth landed) and
    never waits for the kernel ahead; the consumers meet on a named barrier without it."""
    spec = next(c.spec for c in gemv_tma.mark(decode7b).calls
                if dict(c.spec.attrs).get(gemv_tma.ATTR))
    cfg = gemv_tma.TmaConfig(2, 4, 4, depth=3)
    kernel = gemv_tma.gemv_tma_kernel(LinearShape(spec), "k1", cfg)
    body = kernel.device_source[kernel.device_source.index("k1_dev("):]
    producer = body[body.index("if (warp == 8)"):body.index("mlcc_grid_wait();")]
    assert "mlcc_chain_wait(bars + 8 * (c - 3), 0u);" in producer
    assert producer.index("mlcc_chain_wait(") < producer.index("mlcc_chain_copy(")
    assert "return 0;" in producer and "__syncthreads" not in body[body.index("if (warp"):]
    assert body.count("mlcc_chain_sync(1, 256);") == 2  # after the staging, before the sums
    assert 'thread="threadIdx.x"' in kernel.launcher and "T.thread_binding(288" in kernel.launcher
