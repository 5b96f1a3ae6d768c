"""Where the CUDA backend runs a decode layer as one persistent kernel (mlcc.backends.cuda.chain),
on the plans the builder makes, and what the kernel's text and launch carry.

On the Llama-2-7B decode plan (after the GLU fusion) every layer's six calls from o_proj to the
next GEMV become one decode_chain call: 31 ending in the next layer's qkv GEMV, the last in the
output projection (float32 logits). The chain reads what the six calls read from outside the
run (the attention's output, the residual, the weights and norm weights) and writes the next
GEMV's result and the second residual sum where those calls wrote them. Prefill and
batch_decode keep their calls, as do runs whose intermediate values another call reads and
models whose sizes are not whole 256-value blocks. Kernel text is generated (no TVM build);
one build test compiles a small model with the knob on (nvcc).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections import Counter

import pytest
from test_cuda_glu_plan import lowered, plans, tiny_config

from mlcc.backends.cuda import chain, codegen, glu
from mlcc.backends.plan import KernelCall
from mlcc.passes import parse_opt

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def test_every_decode_layer_becomes_one_chain(decode7b):
    chained = chain.fuse_chain(decode7b)
    counts = Counter(c.spec.op for c in chained.calls)
    assert counts[chain.OP] == 32
    assert counts["add_rms_norm"] == 0 and counts[glu.OP] == 0
    assert counts["q_linear"] == 1  # the first layer's qkv GEMV, after the embedding's norm
    assert counts["qkv_attention"] == 32 and counts["rms_norm"] == 1
    assert len(chained.calls) == len(decode7b.calls) - 5 * 32
    specs = {c.spec for c in chained.calls if c.spec.op == chain.OP}
    outputs = sorted((s.outputs[0][0][1], s.outputs[0][1]) for s in specs)
    assert outputs == [(12288, "float16"), (32000, "float32")]


def test_chain_reads_and_writes_what_the_six_calls_did(decode7b):
    old, new = decode7b.calls, chain.fuse_chain(decode7b).calls
    j = 0
    for call in new:
        if call.spec.op != chain.OP:
            assert call == old[j]
            j += 1
            continue
        o, n1, g, d, n2, nxt = old[j:j + 6]
        assert [c.spec.op for c in (o, n1, g, d, n2, nxt)] == [
            "q_linear", "add_rms_norm", glu.OP, "q_linear", "add_rms_norm", "q_linear"]
        read_outside = {b for c in (o, n1, g, d, n2, nxt)
                        for b in c.buffers[:len(c.spec.inputs)]} - {
            o.buffers[3], n1.buffers[3], n1.buffers[4], g.buffers[3], d.buffers[3],
            n2.buffers[3]}
        n_in = len(call.spec.inputs)
        assert set(call.buffers[:n_in]) == read_outside
        assert call.buffers[0] == o.buffers[0]  # the attention's output
        assert call.buffers[n_in:] == [nxt.buffers[3], n2.buffers[4]]
        attrs = dict(call.spec.attrs)
        assert (attrs["hidden"], attrs["intermediate"]) == (4096, 11008)
        assert attrs["eps1"] == n1.spec.attr("eps") and attrs["eps2"] == n2.spec.attr("eps")
        j += 6
    assert j == len(old)


def test_prefill_and_batch_decode_keep_their_calls(llama7b):
    module = lowered("llama2_7b", "q4f16_1", "max_batch_size=4")
    for name, plan in plans(module).items():
        if name == "decode":
            continue
        fused = glu.fuse_glu(plan)
        assert chain.fuse_chain(fused).calls == fused.calls, name


def test_an_intermediate_read_later_keeps_the_layer(decode7b):
    """A call after the run reading the normalized row of the first norm: that layer stays."""
    calls = list(decode7b.calls)
    first = next(i for i, c in enumerate(calls) if c.spec.op == "add_rms_norm")
    normed = calls[first].buffers[3]
    reader = dataclasses.replace(calls[-1], buffers=[normed] + calls[-1].buffers[1:])
    plan = dataclasses.replace(decode7b, calls=calls + [reader])
    chained = chain.fuse_chain(plan)
    assert Counter(c.spec.op for c in chained.calls)[chain.OP] == 31
    assert chained.calls[first - 1].spec.op == "q_linear"  # layer 0's o_proj is still there


def test_sizes_without_whole_blocks_are_not_chained(tmp_path):
    """The tiny cases (hidden 64) have scale rows of 4 bytes: no bulk copies, no chain."""
    module = lowered(tiny_config(tmp_path, "llama"), "q4f16_1", "prefill_chunk_size=4")
    decode = glu.fuse_glu(plans(module)["decode"])
    assert chain.fuse_chain(decode).calls == decode.calls
    wide = lowered(tiny_config(tmp_path, "llama64"), "q4f16_1", "prefill_chunk_size=128")
    decode = glu.fuse_glu(plans(wide)["decode"])
    assert Counter(c.spec.op for c in chain.fuse_chain(decode).calls)[chain.OP] == 2


def test_the_7b_chain_fits_shared_memory_and_launches_one_block_an_sm(decode7b):
    parts = chain.layout(4096, 11008)
    assert parts["total"] <= chain.MAX_SMEM and parts["slot"] == 12384
    call: KernelCall = next(c for c in chain.fuse_chain(decode7b).calls if c.spec.op == chain.OP)
    kernel = chain.gen_decode_chain(call.spec, "k1_decode_chain")
    assert kernel.min_blocks == 1
    assert f'T.alloc_buffer(({parts["total"]},), "uint8", scope="shared.dyn")' in kernel.launcher
    assert f'T.thread_binding({chain.GRID}, thread="blockIdx.x")' in kernel.launcher
    # the producer streams before the wait; consumers wait before any activation read
    body = kernel.device_source[kernel.device_source.index("k1_decode_chain_dev("):]
    # blocks past the participants leave before touching the ring or the barrier
    assert body.index("if (b >= nb)") < body.index("mbarrier.init")
    assert body.index("mlcc_chain_produce<") < body.index("mlcc_grid_wait();")
    assert body.index("mlcc_grid_wait();") < body.index("mlcc_chain_stage<")
    # the next kernel is not released early: its blocks would wait beside the chain's
    assert "mlcc_grid_launch();" not in body


def test_knob_reaches_the_builder(tmp_path):
    from mlcc.backends.cuda.codegen import library_parts

    module = lowered(tiny_config(tmp_path, "llama64"), "q4f16_1", "prefill_chunk_size=128")
    on = library_parts(module, {}, fuse_glu=True, decode_chain=True)
    off = library_parts(module, {}, fuse_glu=True)
    names = [k.name for k in on[0] if k.name.endswith(chain.OP)]
    assert len(names) == 2 and not [k for k in off[0] if k.name.endswith(chain.OP)]
    assert len(re.findall(r'T\.call_cpacked\("k\d+_decode_chain"', on[2])) == 2
    assert parse_opt("O3").enabled("decode_chain") is False
    assert parse_opt("O2;decode_chain=1").enabled("decode_chain") is True


def test_a_chain_never_releases_the_next_kernel_at_its_start(tmp_path):
    """The last chain is followed by the one-block last_logits: still no release at its start
    (every block of a chain must find an SM first)."""
    module = lowered(tiny_config(tmp_path, "llama64"), "q4f16_1", "prefill_chunk_size=128")
    built, plans_, _, _ = codegen.library_parts(module, {}, fuse_glu=True, decode_chain=True)
    early = codegen.early_release(plans_, built)
    assert not [name for name in early if chain.OP in name]


@needs_nvcc
def test_a_small_model_builds_with_the_chain(tmp_path, monkeypatch):
    from mlcc.interface.compile import compile_model

    keep = tmp_path / "kept.cu"
    monkeypatch.setenv("MLCC_CUDA_KEEP_SOURCE", str(keep))
    lib = tmp_path / "lib.so"
    compile_model(tiny_config(tmp_path, "llama64"), lib, quantization="q4f16_1",
                  opt="O2;decode_chain=1", overrides="prefill_chunk_size=128", device="cuda")
    assert lib.is_file()
    code = keep.read_text()
    kernels = re.findall(r"__launch_bounds__\(288, 1\) (k\d+_decode_chain_kernel)\(", code)
    assert len(set(kernels)) == 2
    for name in set(kernels):
        opened = code.index(f"{name}(", code.index(f"{name}(") + 1)
        head = code[opened:code.index("\n}", opened)]
        assert "mlcc_grid_wait();" not in head  # the chain waits itself, after its producer


@needs_nvcc
def test_the_standalone_study_compiles(tmp_path):
    """benchmarks/cuda/chain_proto.cu, the study the kernel comes from, in its default and its
    byte-ring form (the GPU figures are in benchmarks/results/2026-11-30-h200-b)."""
    import subprocess
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda" / "chain_proto.cu"
    for flags in ([], ["-DFIXED=0"]):
        done = subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90a", *flags, "-o",
                               str(tmp_path / "chain"), str(source)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]


def test_below_sm_90_the_builder_turns_the_chain_off(tmp_path, monkeypatch):
    """The chain's bulk copies and mbarriers need sm_90: for other architectures the build says
    so in one log line and makes the kernels it would make without the knob."""
    module = lowered(tiny_config(tmp_path, "llama64"), "q4f16_1", "prefill_chunk_size=128")
    monkeypatch.setattr(codegen, "compile_library", lambda *args, **kwargs: None)
    logs: list[str] = []
    counts = codegen.build(module, tmp_path / "lib.so", {}, archs=("sm_80",), log=logs.append,
                           fuse_glu=True, decode_chain=True)
    assert any(line.startswith("decode_chain off") and "sm_80" in line for line in logs)
    assert chain.OP not in counts
    counts = codegen.build(module, tmp_path / "lib.so", {}, log=logs.append, fuse_glu=True,
                           decode_chain=True)
    assert counts[chain.OP] == 2
