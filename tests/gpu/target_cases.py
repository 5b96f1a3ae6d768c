"""The GPU targets' schedules compiled for CUDA, to run on a GPU against the interpreter.

Metal, OpenCL and WebGPU cannot run here or on the GPU machine, but the TIR they are generated
from can: `mlcc.backends.gpu.codegen.library_module` with a CUDA target that carries a preset's
limits (threads per block, shared memory, warp size) schedules exactly as for that preset, and
CUDA then runs it. Built on the build machine with nvcc (`python tests/gpu/target_cases.py OUT`)
and carried; OUT/manifest.json lists each case with its library, its weights (npz) and the
interpreter's logits and greedy tokens for the same prompts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
# (case, preset whose limits the schedules follow, quantization)
CASES = [("webgpu_q4f32_1", "webgpu", "q4f32_1"), ("iphone_q4f16_1", "iphone", "q4f16_1"),
         ("metal_q4f16_1", "metal", "q4f16_1")]
PROMPTS = [[1, 403, 407, 261, 378], [1, 261, 263, 300, 280, 290, 310, 320, 330, 340, 350]]
GENERATE = 16


def cuda_build_target(preset_name: str):
    from mlcc.backends.targets import PRESETS, BuildTarget

    preset = PRESETS[preset_name]
    config = {"kind": "cuda", "arch": "sm_90", "max_num_threads": preset.max_threads_per_block,
              "max_threads_per_block": preset.max_threads_per_block,
              "max_shared_memory_per_block": preset.max_shared_memory_per_block,
              "thread_warp_size": preset.thread_warp_size, "host": {"kind": "llvm"}}
    return BuildTarget(replace(preset, host="x86_64-linux-gnu"), ".so", None, config)


def build_library(preset_name: str, quantization: str, out: Path) -> None:
    import tvm
    import tvm_ffi

    from mlcc.backends.cuda.toolchain import compile_source, enable_cuda_codegen
    from mlcc.backends.gpu.codegen import library_module
    from mlcc.interface.compile import build_metadata, load_model_config
    from mlcc.passes import build_pipeline, parse_opt, run_passes
    from mlcc.quant import get_scheme

    arch, config, quantization, _ = load_model_config(STORIES, quantization, None)
    scheme = get_scheme(quantization)
    opt = parse_opt("O2")
    passes = build_pipeline(opt, scheme.model_dtype, quantization, config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    target = cuda_build_target(preset_name)
    metadata = build_metadata(module, config, quantization, opt, "cuda")
    mod, _ = library_module(module, metadata, target)
    enable_cuda_codegen()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile",
                                 lambda code, target=None: bytearray(
                                     compile_source(code, ("sm_90",))), override=True)
    device = target.tvm_target()
    with device:
        tvm.compile(mod, target=device).export_library(str(out))


def build_cases(out: Path, log=print) -> dict:
    from mlcc.runtime_check.reference import ReferenceModel

    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, preset, quantization in CASES:
        log(f"building {name}")
        build_library(preset, quantization, out / f"{name}.so")
        reference = ReferenceModel(STORIES, quantization)
        np.savez(out / f"{name}_params.npz", **reference.params)
        expected = []
        for ids in PROMPTS:
            logits = reference.prefill_logits(ids)
            tokens = reference.generate_greedy(ids, GENERATE)
            expected.append({"ids": ids, "prefill_logits": logits.tolist(), "greedy": tokens})
        manifest[name] = {"library": f"{name}.so", "params": f"{name}_params.npz",
                          "quantization": quantization, "preset": preset, "cases": expected}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


if __name__ == "__main__":
    build_cases(Path(sys.argv[1]))
