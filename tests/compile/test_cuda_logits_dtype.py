"""CUDA code for the float32 logits of float16 models, checked without a GPU.

The output projection of a float16 model has out_dtype="float32": its kernel must store to a
`float*` (mlcc_put then writes the float32 sum unrounded) and compile with nvcc, in decode (the
GEMV), in a prefill chunk without lm_head_last_row (tensor-core GEMM) and in batch decode. The
numbers are checked on the GPU (tests/gpu) and by the CPU kernels' tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlcc.backends.cuda import linear
from mlcc.backends.cuda.codegen import device_source, library_parts
from mlcc.backends.plan import KernelSpec, plan_entry
from mlcc.interface.compile import load_model_config
from mlcc.ir.types import Sym
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
PRELUDE = "#include <cuda_fp16.h>\n#include <cstdint>\n"


def lowered(model, quantization: str, opt: str, batch: int = 1):
    arch, config, quant, _ = load_model_config(model, quantization, None)
    config = config.with_overrides(max_batch_size=batch)
    passes = build_pipeline(parse_opt(opt), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    return run_passes(arch.build_module(config), passes).module


def head_specs(module) -> dict[str, KernelSpec]:
    """Entry name -> spec of the projection that writes float32 from float16 activations."""
    found = {}
    for fn in module.functions:
        for call in plan_entry(fn, module).calls:
            spec = call.spec
            if spec.op in ("linear", "q_linear") and spec.outputs[0][1] == "float32":
                assert spec.inputs[0][1] == "float16" and fn.name not in found
                found[fn.name] = spec
    return found


def nvcc_ok(source: str, tmp_path: Path) -> None:
    src = tmp_path / "k.cu"
    src.write_text(PRELUDE + source)
    done = subprocess.run(["nvcc", "--cubin", "-O3", "-std=c++17", "-arch=sm_90", "-o",
                           str(tmp_path / "k.cubin"), str(src)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def stores_float(kernel) -> bool:
    return re.search(r"\bfloat\* __restrict__ y\b", kernel.device_source) is not None


@pytest.mark.parametrize("quantization,opt,batch", [
    ("q4f16_1", "O2", 1), ("q4f16_1", "O0", 1), ("q0f16", "O2", 1), ("q4f16_1", "O2", 4)])
def test_logits_projection_stores_float32_and_compiles(tmp_path, quantization, opt, batch):
    module = lowered(STORIES, quantization, opt, batch)
    heads = head_specs(module)
    assert set(heads) == {fn.name for fn in module.functions}
    built, _, _, _ = library_parts(module, {"params": []})
    kernels = [k for k in built if k.name.endswith("linear") and stores_float(k)]
    assert kernels, "no linear kernel stores float32 logits"
    if opt == "O0":  # the whole chunk's logits: the tensor-core GEMM takes float32 results
        assert any("mma.sync.aligned.m16n8k16.row.col.f32" in k.device_source for k in kernels)
    nvcc_ok(device_source(built), tmp_path)


def test_float32_result_keeps_the_tensor_core_gemm():
    spec = KernelSpec("q_linear", (((Sym("seq_len"), 4096), "float16"),
                                   ((32000, 512), "uint32"), ((32000, 128), "float16")),
                      (((Sym("seq_len"), 32000), "float32"),),
                      (("bits", 4), ("group_size", 32), ("in_features", 4096),
                       ("out_dtype", "float32")))
    kernel = linear.gemm_wmma_rule(spec, "k0_q_linear")
    assert kernel is not None and stores_float(kernel)
    decode = KernelSpec(spec.op, (((1, 4096), "float16"),) + spec.inputs[1:],
                        (((1, 32000), "float32"),), spec.attrs)
    gemv = linear.gemv_q4_rule(decode, "k1_q_linear")
    assert gemv is not None and stores_float(gemv)
