"""Where the CUDA backend folds silu_mul into the prefill gate_up GEMM (mlcc.backends.cuda.glu).

On the Llama-2-7B plans the fusion replaces each layer's prefill (gate_up, silu_mul) pair and
nothing in decode; the fused call reads the GEMM's inputs and writes what the down projection
reads. It declines when another call reads the gate_up values, for float32 activations and for
batch_decode rows (a GEMV takes those), and the `fuse_glu_gemm` knob reaches the CUDA builder.
The tiny models the GPU parity tests build (tests/gpu/cuda_cases.py) fuse too, so the fused
kernel runs there. Kernel text is generated (no TVM build).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mlcc.backends.cuda import codegen
from mlcc.backends.cuda.glu import OP, fuse_glu, linear_spec
from mlcc.backends.plan import BufferRef, EntryPlan, KernelCall, KernelSpec, plan_entry
from mlcc.interface.compile import load_model_config, parse_overrides
from mlcc.ir.types import Sym
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme

TESTS = Path(__file__).resolve().parents[1]
STORIES = TESTS.parent.parent / "shared" / "models" / "stories260K"


def lowered(model, quantization: str, overrides: str | None = None):
    arch, config, quant, _ = load_model_config(model, quantization, None)
    if overrides:
        config = config.with_overrides(**parse_overrides(overrides))
    passes = build_pipeline(parse_opt("O2"), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    return run_passes(arch.build_module(config), passes).module


def plans(module) -> dict[str, EntryPlan]:
    return {fn.name: plan_entry(fn, module) for fn in module.functions}


@pytest.fixture(scope="module")
def llama7b():
    return lowered("llama2_7b", "q4f16_1")


def ops(plan: EntryPlan) -> list[str]:
    return [c.spec.op for c in plan.calls]


def test_one_fused_gemm_per_layer_in_prefill_none_in_decode(llama7b):
    before = plans(llama7b)
    prefill, decode = fuse_glu(before["prefill"]), fuse_glu(before["decode"])
    assert ops(prefill).count(OP) == 32 and "silu_mul" not in ops(prefill)
    assert len(prefill.calls) == len(before["prefill"].calls) - 32
    assert OP not in ops(decode) and ops(decode) == ops(before["decode"])
    old = before["prefill"].calls
    for i, call in enumerate(c for c in old if c.spec.op == "silu_mul"):
        at = old.index(call)
        gate_up, fused = old[at - 1], [c for c in prefill.calls if c.spec.op == OP][i]
        assert fused.buffers == gate_up.buffers[:3] + [call.buffers[1]]
        assert fused.spec.inputs == gate_up.spec.inputs
        assert fused.spec.outputs == call.spec.outputs  # [seq_len, 11008] float16
        assert dict(fused.spec.attrs)["glu_weights"] == "q4"
        assert linear_spec(fused.spec) == gate_up.spec  # the GEMM it runs is the unfused one
        assert "layers" in gate_up.buffers[1].name and "gate_up_proj" in gate_up.buffers[1].name


def test_library_parts_fuses_only_with_the_flag(llama7b):
    _, off, _, _ = codegen.library_parts(llama7b, {"params": []})
    built, on, _, _ = codegen.library_parts(llama7b, {"params": []}, fuse_glu=True)
    assert all(OP not in ops(p) for p in off)
    assert {p.name: ops(p).count(OP) for p in on} == {"prefill": 32, "decode": 0}
    fused = [k for k in built if k.name.endswith(OP)]
    assert len(fused) == 1 and "mma.sync" in fused[0].device_source
    assert "(seq_len, 11008)" in fused[0].launcher


def test_knob_reaches_the_cuda_builder(monkeypatch, llama7b):
    from mlcc.backends import build_model_library

    seen = []
    monkeypatch.setattr(codegen, "build",
                        lambda *args, **kwargs: seen.append(kwargs["fuse_glu"]) or {})
    for opt in ("O2", "O1", "O0", "O2;fuse_glu_gemm=0", "O0;fuse_glu_gemm=1", None):
        build_model_library(llama7b, Path("x.so"), {}, device="cuda",
                            opt=None if opt is None else parse_opt(opt))
    assert seen == [True, True, False, False, True, True]


def test_no_fusion_when_another_call_reads_the_gate_up_values(llama7b):
    prefill = plans(llama7b)["prefill"]
    calls = list(prefill.calls)
    at = next(i for i, c in enumerate(calls) if c.spec.op == "silu_mul")
    gate_up = calls[at - 1].buffers[3]
    copy = dataclasses.replace(gate_up, name="copy")
    reader = KernelCall(KernelSpec("scale", ((gate_up.shape, "float16"),),
                                   ((gate_up.shape, "float16"),), (("factor", 2.0),)),
                        [gate_up, copy])
    calls.insert(at + 5, reader)
    fused = fuse_glu(dataclasses.replace(prefill, calls=calls))
    assert ops(fused).count(OP) == 31
    kept = fused.calls.index(next(c for c in fused.calls if c.spec.op == "silu_mul"))
    assert fused.calls[kept - 1].spec.op == "q_linear"
    assert fused.calls[kept - 1].buffers[3] == gate_up


def gate_up_pair(rows, dtype: str = "float16") -> list[KernelCall]:
    spec = KernelSpec("q_linear", (((rows, 256), dtype), ((512, 32), "uint32"),
                                   ((512, 8), "float16")), (((rows, 512), dtype),),
                      (("bits", 4), ("group_size", 32), ("in_features", 256)))
    refs = [BufferRef("x", (rows, 256), dtype, "workspace"),
            BufferRef("w.q_weight", (512, 32), "uint32", "arg", "w.q_weight"),
            BufferRef("w.q_scale", (512, 8), "float16", "arg", "w.q_scale"),
            BufferRef("gu", (rows, 512), dtype, "workspace", offset=4096),
            BufferRef("h", (rows, 256), dtype, "workspace", offset=8192)]
    silu = KernelSpec("silu_mul", (((rows, 512), dtype),), (((rows, 256), dtype),), ())
    return [KernelCall(spec, refs[:4]), KernelCall(silu, refs[3:])]


@pytest.mark.parametrize("rows,dtype,fuses", [
    (Sym("seq_len"), "float16", True),
    (Sym("seq_len"), "float32", False),  # the tensor-core GEMM takes float16 activations only
    (Sym("batch"), "float16", False),  # batch_decode: the tensor-core GEMV's rows
    (1, "float16", False),  # decode: the GEMV
    (64, "float16", True),  # a static prefill chunk still runs on the GEMM
])
def test_fuses_exactly_the_calls_the_prefill_gemm_takes(rows, dtype, fuses):
    plan = EntryPlan("prefill", [], gate_up_pair(rows, dtype))
    assert ops(fuse_glu(plan)) == ([OP] if fuses else ["q_linear", "silu_mul"])


def test_float32_models_keep_silu_mul():
    for plan in plans(lowered(STORIES, "q0f32")).values():
        assert OP not in ops(fuse_glu(plan))
    assert ops(fuse_glu(plans(lowered(STORIES, "q4f16_1"))["prefill"])).count(OP) == 5


def tiny_config(folder: Path, name: str) -> Path:
    """config.json of a tests/gpu/cuda_cases.py model (the sizes that matter to the GEMM)."""
    sys.path.insert(0, str(TESTS / "gpu"))
    try:
        from cuda_cases import TINY, WIDE
    finally:
        sys.path.remove(str(TESTS / "gpu"))
    arch = "mistral" if name.startswith("mistral") else "llama"
    config = {**TINY, **(WIDE if name.endswith("64") else {"num_key_value_heads": 2})}
    if arch == "mistral":
        config["sliding_window"] = 40 if name.endswith("64") else 8
    config.update(model_type=arch, architectures=[f"{arch.capitalize()}ForCausalLM"])
    (folder / name).mkdir()
    (folder / name / "config.json").write_text(json.dumps(config))
    return folder / name


@pytest.mark.parametrize("name", ["llama", "mistral", "llama64", "mistral64"])
def test_gpu_parity_models_run_the_fused_kernel(tmp_path, name):
    model = tiny_config(tmp_path, name)
    for quantization in ("q0f16", "q4f16_1"):
        module = lowered(model, quantization, "prefill_chunk_size=4")
        counts = {n: ops(fuse_glu(p)).count(OP) for n, p in plans(module).items()}
        assert counts == {"prefill": 2, "decode": 0}, (quantization, counts)
