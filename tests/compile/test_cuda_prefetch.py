"""L2 prefetch of the decode GEMVs' weights (mlcc.backends.cuda.prefetch), checked on the CPU.

The plan change on a real model (stories260K, q4f16_1): which calls prefetch, the buffers they
receive and the byte ranges they name (the head rows of the weight and its scales; both halves
of a gate_up). The wrapped kernel: its launcher parses and passes the extra buffers first, its
device wrapper prefetches, waits, then forwards every argument; run on the host it computes
what the unwrapped kernel computes. nvcc for sm_90 emits the bulk prefetch instructions.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from nvcc_probe import cubin_report, entry_ptx
from test_cuda_elementwise_vec import norm_spec, run_host

from mlcc.backends.cuda import glu, prefetch
from mlcc.backends.cuda.codegen import COMMON_SOURCE, kernel_for, library_parts
from mlcc.backends.cuda.kernels import GRID_WAIT, gen_norm, norm_vec_block
from mlcc.backends.llvm.codegen import parse_functions
from mlcc.backends.plan import KernelCall, KernelSpec

STORIES = Path(__file__).parents[2].parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="module")
def stories():
    from mlcc.interface.compile import build_metadata, load_model_config
    from mlcc.passes import build_pipeline, parse_opt, run_passes
    from mlcc.quant import get_scheme

    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    arch, config, quantization, _ = load_model_config(STORIES, "q4f16_1", None)
    opt = parse_opt("O2")
    passes = build_pipeline(opt, get_scheme(quantization).model_dtype, quantization,
                            config.prefill_chunk_size, config.tensor_parallel_shards)
    module = run_passes(arch.build_module(config), passes).module
    return module, build_metadata(module, config, quantization, opt, "cuda")


def plans_with(stories, budget):
    module, metadata = stories
    return {p.name: p for p in library_parts(module, metadata, fuse_glu=True,
                                             l2_prefetch=budget)[1]}


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def test_light_kernels_before_decode_gemvs_prefetch_their_weights(stories):
    plain, plans = plans_with(stories, 0), plans_with(stories, 1 << 30)
    assert [c.spec for c in plans["prefill"].calls] == [c.spec for c in plain["prefill"].calls]
    calls, before = plans["decode"].calls, plain["decode"].calls
    assert len(calls) == len(before)
    gemvs = [i for i, c in enumerate(before) if prefetch.prefetch_for(c, 1) is not None]
    assert len(gemvs) >= 3 * 5  # qkv, gate_up and down ... of every layer, and the lm_head
    marked = [i for i, c in enumerate(calls) if prefetch.ATTR in dict(c.spec.attrs)]
    expected = [i - 1 for i in gemvs if before[i - 1].spec.op in prefetch.LIGHT_OPS]
    assert marked == expected and len(marked) >= 3 * 5
    ops = {before[i + 1].spec.op for i in marked}
    assert ops == {"q_linear", glu.OP}  # the GLU GEMV's gate_up is prefetched too
    for i in marked:
        gemv, here = before[i + 1], calls[i]
        assert here.buffers[:len(before[i].buffers)] == before[i].buffers
        assert here.buffers[len(before[i].buffers):] == gemv.buffers[1:3]  # weight, scales
        tensors = dict(here.spec.attrs)[prefetch.ATTR]
        for (shape, dtype, ranges), ref in zip(tensors, gemv.buffers[1:3]):
            assert (shape, dtype) == (ref.shape, ref.dtype)
            # a budget above the GEMV's size names every byte of it, once
            assert sum(hi - lo for lo, hi in ranges) == nbytes(shape, dtype)
            assert ranges[0][0] == 0 and ranges[-1][1] == nbytes(shape, dtype)


def test_a_small_budget_names_the_head_rows_of_each_half(stories):
    plans = plans_with(stories, 1)
    seen = set()
    for call in plans["decode"].calls:
        tensors = dict(call.spec.attrs).get(prefetch.ATTR)
        if tensors is None:
            continue
        for shape, dtype, ranges in tensors:
            row = shape[1] * np.dtype(dtype).itemsize
            if len(ranges) == 2:  # gate_up: row 0 of the gate and of the up half
                half = shape[0] // 2 * row
                assert ranges == ((0, row), (half, half + row))
                seen.add("glu")
            else:
                assert ranges == ((0, row),)
                seen.add("plain")
    assert seen == {"glu", "plain"}


def test_budget_limits_the_rows_to_the_bytes_given():
    spec = KernelSpec("q_linear", (((1, 4096), "float16"), ((11008, 512), "uint32"),
                                   ((11008, 128), "float16")), (((1, 11008), "float16"),),
                      (("bits", 4), ("group_size", 32), ("in_features", 4096)))
    call = KernelCall(spec, ["x", "w", "s", "y"])
    buffers, tensors = prefetch.prefetch_for(call, 8 << 20)
    assert buffers == ["w", "s"]
    per_row = 512 * 4 + 128 * 2
    take = (8 << 20) // per_row
    assert tensors == (((11008, 512), "uint32", ((0, take * 2048),)),
                       ((11008, 128), "float16", ((0, take * 256),)))
    assert prefetch.prefetch_for(call, 0) is None
    prefill = KernelSpec("q_linear", (((prefetch_sym(), 4096), "float16"),) + spec.inputs[1:],
                         spec.outputs, spec.attrs)
    assert prefetch.prefetch_for(KernelCall(prefill, ["x", "w", "s", "y"]), 8 << 20) is None


def prefetch_sym():
    from mlcc.ir.types import Sym

    return Sym("seq_len")


def wrapped_norm(h: int = 4096):
    spec = norm_spec("add_rms_norm", 1, h)
    value = (((8192, 512), "uint32", ((0, 65536), (1 << 21, (1 << 21) + 65536))),
             ((8192, 128), "float16", ((0, 4096),)))
    marked = KernelSpec(spec.op, spec.inputs, spec.outputs, spec.attrs + ((prefetch.ATTR, value),))
    return spec, kernel_for(marked, "k0_norm")


def test_wrapped_launcher_parses_and_passes_the_prefetched_buffers_first():
    spec, kernel = wrapped_norm()
    plain = kernel_for(spec, "k0_norm")
    assert kernel.name == plain.name and kernel.single_block() == plain.single_block()
    functions = parse_functions(kernel.launcher)
    assert [str(f.attrs["global_symbol"]) for _, f in functions.functions.items()] == ["k0_norm"]
    assert re.search(r"def k0_norm\([^)]*, pf0_h: T\.handle, pf1_h: T\.handle\):",
                     kernel.launcher)
    assert 'pf0 = T.match_buffer(pf0_h, (8192, 512), "uint32")' in kernel.launcher
    assert ('T.call_extern("int32", "k0_norm_dev_pf", pf0.data, pf1.data, x.data'
            in kernel.launcher)
    assert kernel.self_waiting == ("k0_norm_dev_pf",)
    wrapper = kernel.device_source[kernel.device_source.index("k0_norm_dev_pf("):]
    issued = re.findall(r"mlcc_l2_prefetch\((pf\d), (\d+)LL, (\d+)LL\);", wrapper)
    assert issued == [("pf0", "0", "65536"), ("pf0", str(1 << 21), str((1 << 21) + 65536)),
                      ("pf1", "0", "4096")]
    assert wrapper.index("mlcc_l2_prefetch") < wrapper.index(GRID_WAIT) < wrapper.index(
        "return k0_norm_dev(a...);")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_wrapped_norm_computes_what_the_plain_one_does_on_the_host(tmp_path):
    h = 4096
    _, kernel = wrapped_norm(h)
    rng = np.random.default_rng(7)
    arrays = {"x": rng.standard_normal((1, h)).astype(np.float16),
              "r": rng.standard_normal((1, h)).astype(np.float16),
              "w": (1 + 0.1 * rng.standard_normal(h)).astype(np.float16),
              "y": np.zeros((1, h), np.float16), "s": np.zeros((1, h), np.float16),
              "pw": np.zeros(4, np.float16)}
    # the prefetch helper compiles to nothing off the GPU; the grid wait is host_shim's no-op
    body = (prefetch.source()
            + kernel.device_source[kernel.device_source.index("__device__ __forceinline__ int "):])
    args = "x.data(), r.data(), w.data(), y.data(), s.data()"
    out = {}
    for name, call in (("plain", f"k0_norm_dev({args})"),
                       ("wrapped", f"k0_norm_dev_pf(pw.data(), pw.data() + 2, {args})")):
        folder = tmp_path / name
        folder.mkdir()
        out[name] = run_host(folder, kernel, call, norm_vec_block(h), 1,
                             {k: v.copy() for k, v in arrays.items()}, ["y", "s"], body=body)
    for key in ("y", "s"):
        assert np.any(out["plain"][key] != 0)
        np.testing.assert_array_equal(out["wrapped"][key], out["plain"][key])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_nvcc_emits_bulk_l2_prefetches_before_the_grid_wait(tmp_path):
    _, kernel = wrapped_norm()
    source = ("#define MLCC_PDL 1\n" + COMMON_SOURCE + prefetch.source() + kernel.device_source
              + "\n__global__ void probe0(const unsigned* w, const half* s, const half* x, "
              "const half* r, const half* g, half* y, half* t) { k0_norm_dev_pf(w, s, x, r, g, "
              "y, t); }\n")
    cubin_report(tmp_path, source)
    ptx = entry_ptx(tmp_path, ["probe0"])["probe0"]
    assert ptx.count("cp.async.bulk.prefetch.L2.global") >= 1
    assert ptx.index("cp.async.bulk.prefetch.L2.global") < ptx.index("griddepcontrol.wait")
    assert gen_norm(norm_spec("add_rms_norm", 1, 4096), "k0_norm").device_source in source
