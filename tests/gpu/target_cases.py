"""The GPU targets' schedules compiled for CUDA, to run on a GPU against the interpreter.

Metal, OpenCL and WebGPU cannot run here or on the GPU machine, but the TIR they are generated
from can: `mlcc.backends.gpu.codegen.library_module` with a CUDA target that carries a preset's
limits (threads per block, shared memory, warp size) schedules exactly as for that preset, and
CUDA then runs it. Built on the build machine with nvcc (`python tests/gpu/target_cases.py OUT`)
and carried; OUT/manifest.json lists each case with its library, its weights (npz) and the
interpreter's logits and greedy tokens for the same prompts. OUT/kernels/ holds, per model and
preset, one library with every distinct kernel, random inputs, and the outputs of the same
kernels built with serial loops for the CPU (norms there come from the portable kernel, an
independent implementation of the GPU's shared-memory reduction).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
# (case, preset whose limits the schedules follow, quantization)
CASES = [("webgpu_q4f32_1", "webgpu", "q4f32_1"), ("iphone_q4f16_1", "iphone", "q4f16_1"),
         ("metal_q4f16_1", "metal", "q4f16_1")]
TINY = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
        "intermediate_size": 96, "max_position_embeddings": 64, "initializer_range": 0.2}
# (model, quantization, presets) whose every kernel is compared one by one
KERNEL_CASES = [("stories260K", "q4f16_1", ("iphone", "metal")),
                ("gpt_neox", "q4f16_1", ("iphone", "metal")),
                ("gpt_neox", "q0f32", ("webgpu",)), ("mistral", "q4f32_1", ("webgpu",))]
ROWS = 5  # the symbolic row count of the kernels' random inputs
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
    enable_compiled_cuda()
    device = target.tvm_target()
    with device:
        tvm.compile(mod, target=device).export_library(str(out))


def tiny_models(out: Path) -> dict[str, Path]:
    import torch
    import transformers

    makers = {
        "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **{**TINY, "hidden_size": 128, "num_attention_heads": 4}, rotary_pct=0.25,
            use_parallel_residual=True)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
            **TINY, num_key_value_heads=2, sliding_window=8)),
    }
    folders = {"stories260K": STORIES}
    for name, make in makers.items():
        torch.manual_seed(sum(map(ord, name)))
        folders[name] = out / "models" / name
        if not (folders[name] / "config.json").is_file():
            make().save_pretrained(folders[name])
    return folders


def kernel_specs(model: Path, quantization: str) -> list:
    from mlcc.backends.plan import plan_entry
    from mlcc.interface.compile import load_model_config
    from mlcc.passes import build_pipeline, parse_opt, run_passes
    from mlcc.quant import get_scheme

    arch, config, quantization, _ = load_model_config(model, quantization, None)
    scheme = get_scheme(quantization)
    passes = build_pipeline(parse_opt("O2"), scheme.model_dtype, quantization,
                            config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    specs: list = []
    for fn in module.functions:
        for call in plan_entry(fn, module).calls:
            if call.spec not in specs:
                specs.append(call.spec)
    return specs


def random_arguments(func, rng) -> list[np.ndarray]:
    """Inputs for every buffer of a kernel, read from its signature; symbols become ROWS."""
    text = re.sub(r"T\.int(?:32|64)\((\d+)\)", r"\1", func.script())
    signature = text[text.index("def "):text.index("):\n")]
    args = []
    for name, dims, dtype in re.findall(r'(\w+): T\.Buffer\(\(([^)]*)\),? ?"?(\w*)"?\)',
                                        signature):
        shape = [int(d) if d.strip().isdigit() else ROWS for d in dims.split(",") if d.strip()]
        dtype = dtype or "float32"
        if dtype == "uint32":
            args.append(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32))
        elif dtype == "int32":  # token ids, page numbers, positions: small and in range
            values = np.array([2, 0]) if name == "seq_info" else np.arange(np.prod(shape)) % 3
            args.append(values.reshape(shape).astype(np.int32))
        else:
            args.append((rng.standard_normal(shape) * 0.5).astype(dtype))
    return args


def build_kernel_case(model: Path, quantization: str, preset: str, out: Path, name: str) -> dict:
    import tvm

    from mlcc.backends.gpu.codegen import kernel_func

    target = cuda_build_target(preset)
    device, host = target.tvm_target(), target.host_target()
    limit = min(256, target.preset.max_threads_per_block)
    rng = np.random.default_rng(0)
    gpu_funcs, arrays, kernels = {}, {}, {}
    for i, spec in enumerate(kernel_specs(model, quantization)):
        kernel = f"k{i}_{spec.op}"
        serial = kernel_func(spec, kernel, host, limit, False)
        args = random_arguments(serial, rng)
        built = tvm.compile(tvm.IRModule({kernel: serial.with_attr("target", host)}),
                            target=host)
        tensors = [tvm.runtime.tensor(a) for a in args]
        built[kernel](*tensors)
        for j, (before, after) in enumerate(zip(args, tensors)):
            arrays[f"{kernel}.in{j}"], arrays[f"{kernel}.out{j}"] = before, after.numpy()
        kernels[kernel] = len(args)
        gpu = kernel_func(spec, kernel, device, limit, True, preset == "webgpu")
        gpu_funcs[kernel] = gpu.with_attr("target", device)
    with device:
        tvm.compile(tvm.IRModule(gpu_funcs), target=device).export_library(str(out / f"{name}.so"))
    np.savez(out / f"{name}.npz", **arrays)
    return {"library": f"{name}.so", "arrays": f"{name}.npz", "kernels": kernels,
            "quantization": quantization}


def build_kernel_cases(out: Path, log=print) -> dict:
    enable_compiled_cuda()
    out.mkdir(parents=True, exist_ok=True)
    models = tiny_models(out)
    manifest = {}
    for model, quantization, presets in KERNEL_CASES:
        for preset in presets:
            name = f"{model}_{quantization}_{preset}"
            log(f"building kernels {name}")
            manifest[name] = build_kernel_case(models[model], quantization, preset, out, name)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def enable_compiled_cuda() -> None:
    """nvcc compiles the device code at build time (no CUDA driver needed here)."""
    import tvm_ffi

    from mlcc.backends.cuda.toolchain import compile_source, enable_cuda_codegen

    enable_cuda_codegen()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile",
                                 lambda code, target=None: bytearray(
                                     compile_source(code, ("sm_90",))), override=True)


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
    build_kernel_cases(out / "kernels", log)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


if __name__ == "__main__":
    build_cases(Path(sys.argv[1]))
