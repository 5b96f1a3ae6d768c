"""`mlcc compile`: mlc-chat-config.json (or an HF folder / preset) -> one model library.

Stages: read the model config and apply `--overrides`; build the IR from the frontend's model
description; run the pass pipeline of the optimization level; estimate memory; lower every
fused kernel to TensorIR and build the library with its metadata. The library is written under
a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlcc import __version__, ir
from mlcc.backends.targets import (
    BuildTarget,
    check_cpu_output,
    check_prefix,
    preset_for,
    resolve_build_target,
)
from mlcc.errors import MlccError
from mlcc.passes import OptConfig, build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme
from mlcc.runtime_check.compiled import LIBRARY_ABI

STAGE = "compile"
OVERRIDABLE = ("context_window_size", "prefill_chunk_size", "sliding_window_size",
               "attention_sink_size", "max_batch_size", "tensor_parallel_shards")
SUPPORTED_DEVICES = ("cpu", "llvm")
KNOWN_DEVICES = ("cuda", "rocm", "metal", "vulkan", "opencl", "webgpu", "iphone", "android")
LIB_SUFFIXES = (".so", ".tar", ".dylib", ".dll", ".wasm")


@dataclass
class CompileResult:
    output: Path
    module: ir.Module
    metadata: dict
    stage_seconds: dict[str, float] = field(default_factory=dict)
    pass_seconds: dict[str, float] = field(default_factory=dict)


def parse_overrides(text: str | None) -> dict[str, int]:
    """`"context_window_size=1024;prefill_chunk_size=128"` -> dict, validated by name."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in OVERRIDABLE:
            raise MlccError(STAGE, f"--overrides entry {part!r} is not understood; use "
                            f"name=value with names {', '.join(OVERRIDABLE)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise MlccError(STAGE, f"--overrides {key}={value!r} must be an integer") from None
    return out


def resolve_device(device: str) -> str:
    """The backend kind for `--device`: "llvm", "cuda" (or "cuda-sm_90,sm_80"), or the name of a
    GPU preset (iphone, android, metal, webgpu, rocm, opencl) or the TVM target JSON itself."""
    name = device.strip().lower()
    if name == "auto":
        return "cuda" if _cuda_visible() else "llvm"
    if name in SUPPORTED_DEVICES:
        return "llvm"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        return "cuda"  # one library serves every GPU of the architecture
    if name.startswith("cuda-sm_") and all(a.startswith("sm_") and a[3:].isdigit()
                                           for a in name[5:].split(",")):
        return name
    if preset_for(device) is not None:  # raises for vulkan and for a bad target JSON
        return device.strip() if device.strip().startswith("{") else name
    if name.startswith("cuda"):
        raise MlccError(STAGE, f"--device {device}: CUDA devices are written cuda, cuda:N "
                        "(N a number) or cuda-sm_90,sm_80 (a fatbin per architecture)")
    raise MlccError(STAGE, f"--device {device} is unknown; use cpu/llvm, cuda, or one of "
                    f"{', '.join(d for d in KNOWN_DEVICES if d != 'cuda')}, a TVM target JSON, "
                    "or auto")


def check_output(kind: str, device: str, host: str | None, output: Path, model_type: str,
                 quantization: str, model_dtype: str,
                 system_lib_prefix: str | None) -> BuildTarget | None:
    """Refuse impossible device/host/suffix combinations before any work; the GPU presets'
    build target (None for the CPU and CUDA backends)."""
    if kind == "llvm":
        check_cpu_output(host, output.suffix)
        if system_lib_prefix is not None:
            check_prefix(system_lib_prefix)
        return None
    if kind.startswith("cuda"):
        if output.suffix != ".so":
            raise MlccError(STAGE, f"-o {output}: the CUDA backend writes a shared library "
                            f"for this machine (--device {device}); use -o lib.so")
        if host is not None:
            raise MlccError(STAGE, f"--device {device} --host {host}: CUDA libraries are built "
                            "for this machine's host only; drop --host")
        return None
    return resolve_build_target(device, host, output, model_type, quantization, model_dtype,
                                system_lib_prefix)


def _cuda_visible() -> bool:
    """A CUDA GPU is visible (driver library loads and reports a device)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:  # a stub driver (loaded for building without a GPU) lacks these entry points
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
    except AttributeError:
        return False
    return count.value > 0


def load_model_config(model: str | Path, quantization: str | None, model_type: str | None):
    """(architecture, config, quantization, conv/chat dict or None) from any model source."""
    from mlcc.frontend import get_architecture, resolve_model

    path = Path(model)
    if path.is_dir() and (path / "mlc-chat-config.json").is_file():
        path = path / "mlc-chat-config.json"
    if path.name == "mlc-chat-config.json":
        if not path.is_file():
            raise MlccError(STAGE, f"{path} does not exist; run `mlcc gen_config` first")
        try:
            chat = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MlccError(STAGE, f"{path} is not valid JSON ({err})") from None
        arch = get_architecture(model_type or chat["model_type"])
        config = arch.config_cls.from_json(chat["model_config"])
        stored = chat.get("quantization")
        if quantization and stored and quantization != stored:
            raise MlccError(STAGE, f"--quantization {quantization} contradicts {path} "
                            f"({stored}); drop the option or regenerate the config")
        return arch, config, quantization or stored, chat
    source = resolve_model(model, model_type)
    if not quantization:
        raise MlccError(STAGE, f"{model}: --quantization is required when compiling from an "
                        "HF folder, config.json or preset (mlc-chat-config.json records it)")
    return source.arch, source.config, quantization, None


def _memory(module: ir.Module) -> dict[str, int]:
    import numpy as np

    params = sum(int(np.prod(p.type.shape)) * np.dtype(p.type.dtype).itemsize
                 for p in module.params)
    layout = dict(module.attrs.get("kv_layout", ()))
    kv = layout.get("bytes_per_token", 0) * layout.get("capacity", 0)
    workspace = max((fn.attrs.get("workspace_bytes", 0) for fn in module.functions), default=0)
    return {"params_bytes": params, "kv_cache_bytes": kv, "workspace_bytes": workspace}


def build_metadata(module: ir.Module, config, quantization: str, opt: OptConfig,
                   device: str) -> dict[str, Any]:
    bounds = dict(module.attrs.get("symbol_bounds", ()))
    entries = {}
    for fn in module.functions:
        entries[fn.name] = {
            "inputs": [{"name": v.name, "type": str(v.type)} for v in fn.inputs],
            "outputs": [str(v.type) for v in fn.outputs],
            "workspace_bytes": fn.attrs.get("workspace_bytes", 0),
        }
    return {
        "model_type": module.attrs.get("model_type", module.name),
        "quantization": quantization,
        "model_config": config.to_json(),
        "params": [{"name": p.name, "shape": list(p.type.shape), "dtype": p.type.dtype}
                   for p in module.params],
        "kv_layout": dict(module.attrs.get("kv_layout", ())),
        "symbol_bounds": bounds,
        "memory": _memory(module),
        "entries": entries,
        "opt": opt.describe(),
        "device": device,
        "compiler": f"mlcc {__version__}",
        "abi": LIBRARY_ABI,
    }


def compile_model(model: str | Path, output: str | Path, quantization: str | None = None,
                  model_type: str | None = None, device: str = "cpu", host: str | None = None,
                  opt: str | None = "O2", system_lib_prefix: str | None = None,
                  overrides: str | None = None, debug_dump: str | Path | None = None,
                  log: Callable[[str], None] = lambda s: None) -> CompileResult:
    """Compile `model` into the library `output`; returns what was built and how long it took."""
    output = Path(output)
    if output.suffix not in LIB_SUFFIXES:
        raise MlccError(STAGE, f"-o {output}: the suffix chooses the artifact; use one of "
                        f"{', '.join(LIB_SUFFIXES)}")
    if output.is_dir():
        raise MlccError(STAGE, f"-o {output} is a folder; give a file name such as {output}/lib.so")
    kind = resolve_device(device)
    opt_config = parse_opt(opt)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    arch, config, quantization, _ = load_model_config(model, quantization, model_type)
    scheme = get_scheme(quantization)
    build_target = check_output(kind, device, host, output, arch.name, quantization,
                                scheme.model_dtype, system_lib_prefix)
    changes = parse_overrides(overrides)
    if changes:
        config = config.with_overrides(**changes)
    log(f"model: {arch.name}, quantization: {quantization}, device: {kind}, "
        f"opt: {opt_config.describe()}")
    log(f"context_window_size={config.context_window_size} "
        f"sliding_window_size={config.sliding_window_size} "
        f"prefill_chunk_size={config.prefill_chunk_size} "
        f"attention_sink_size={config.attention_sink_size}")
    module = arch.build_module(config)
    timings["build IR"] = time.perf_counter() - start
    start = time.perf_counter()
    passes = build_pipeline(opt_config, scheme.model_dtype, quantization,
                            config.prefill_chunk_size, config.tensor_parallel_shards)
    result = run_passes(module, passes, dump_dir=Path(debug_dump) if debug_dump else None,
                        on_pass=lambda name: log(f"  pass {name}"))
    timings["passes"] = time.perf_counter() - start
    module = result.module
    metadata = build_metadata(module, config, quantization, opt_config, kind)
    mem = metadata["memory"]
    log("memory: params {:.1f} MB, KV cache {:.1f} MB, workspace {:.1f} MB".format(
        mem["params_bytes"] / 1e6, mem["kv_cache_bytes"] / 1e6, mem["workspace_bytes"] / 1e6))
    start = time.perf_counter()
    from mlcc.backends import build_model_library

    build_model_library(module, output, metadata, device=build_target or kind, host=host,
                        opt=opt_config, system_lib_prefix=system_lib_prefix, log=log)
    timings["codegen + build"] = time.perf_counter() - start
    log(f"wrote {output}")
    return CompileResult(output, module, metadata, timings,
                         {t.name: t.seconds for t in result.timings})
