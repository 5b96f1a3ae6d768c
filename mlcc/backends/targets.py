"""Where a library runs: `--device` presets, `--host` LLVM triples and the output-suffix rules.

A device preset names the GPU language TVM generates (metal, opencl, webgpu, rocm), the host
triple the entry code is compiled for, and the limits the GPU schedules must respect:

    device   kind    default host                  threads  shared   warp  fp16  usual -o
    iphone   metal   arm64-apple-ios               256      32 KB    1     yes   .tar
    android  opencl  aarch64-linux-android         256      16 KB    1     yes   .tar
    metal    metal   arm64-apple-darwin            1024     32 KB    32    yes   .dylib
    webgpu   webgpu  wasm32-unknown-unknown-wasm   256      16 KB    1     no    .wasm
    rocm     rocm    x86_64-linux-gnu              1024     64 KB    64    yes   .so
    opencl   opencl  x86_64-linux-gnu              256      32 KB    1     yes   .so
    vulkan   vulkan  (needs SPIR-V codegen: not in the PyPI TVM wheel)

A TVM target JSON (`--device '{"kind": "metal", ...}'`) uses its own limits and host.

The suffix of `-o` chooses the artifact: `.tar` holds object files for static linking (with a
system-library prefix on every exported symbol: `--system-lib-prefix`, by default
`<model_type>_<quantization>_` for iphone and android); `.so`, `.dylib`, `.dll` are shared
libraries linked for the host; `.wasm` is a WebAssembly module linked with emscripten and TVM's
web runtime. `check_toolchain` fails before any work when the linker an output needs is missing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlcc.errors import MlccError

STAGE = "compile"
SUFFIXES = (".so", ".tar", ".dylib", ".dll", ".wasm")
GPU_KINDS = ("metal", "opencl", "webgpu", "rocm")
ROCM_BITCODE = ("ocml", "oclc_daz_opt_off", "oclc_unsafe_math_off",
                "oclc_finite_only_off", "oclc_correctly_rounded_sqrt_on",
                "oclc_wavefrontsize64_on", "oclc_abi_version_500")
ROCM_BITCODE_DIRS = ("/opt/rocm/amdgcn/bitcode", "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode",
                     "/usr/lib/amdgcn/bitcode")
# ld.lld before LLVM 19 rejects the code object version that TVM's LLVM 22 writes.
LLD_NAMES = ("ld.lld-22", "ld.lld-21", "ld.lld-20", "ld.lld-19", "ld.lld")

# LLVM triples accepted by --host, and what they are for.
HOST_TRIPLES: dict[str, str] = {
    "x86_64-linux-gnu": "64-bit x86 Linux",
    "aarch64-linux-gnu": "64-bit ARM Linux",
    "aarch64-linux-android": "Android phones (64-bit ARM)",
    "arm64-apple-ios": "iPhone and iPad",
    "arm64-apple-darwin": "Apple silicon Macs",
    "x86_64-apple-darwin": "Intel Macs",
    "x86_64-pc-windows-msvc": "64-bit Windows",
    "wasm32-unknown-unknown-wasm": "WebAssembly (browsers, WebGPU)",
}


@dataclass(frozen=True)
class DevicePreset:
    """A named device: the GPU language, the host triple and the schedule limits."""

    name: str
    kind: str
    host: str
    max_threads_per_block: int
    max_shared_memory_per_block: int
    thread_warp_size: int
    supports_fp16: bool
    static_by_default: bool = False  # .tar with the model's symbol prefix (phone apps)
    extra: tuple[tuple[str, Any], ...] = ()


PRESETS: dict[str, DevicePreset] = {p.name: p for p in (
    DevicePreset("iphone", "metal", "arm64-apple-ios", 256, 32768, 1, True,
                 static_by_default=True),
    DevicePreset("android", "opencl", "aarch64-linux-android", 256, 16384, 1, True,
                 static_by_default=True),
    DevicePreset("metal", "metal", "arm64-apple-darwin", 1024, 32768, 32, True),
    DevicePreset("webgpu", "webgpu", "wasm32-unknown-unknown-wasm", 256, 16384, 1, False),
    DevicePreset("rocm", "rocm", "x86_64-linux-gnu", 1024, 65536, 64, True,
                 extra=(("mcpu", "gfx942"),)),
    DevicePreset("opencl", "opencl", "x86_64-linux-gnu", 256, 32768, 1, True),
)}


@dataclass(frozen=True)
class BuildTarget:
    """Everything the GPU backend needs to know about one build."""

    preset: DevicePreset
    suffix: str
    system_lib_prefix: str | None = None
    config: dict = field(default_factory=dict, hash=False)  # the TVM target of the device

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.config)

    def host_target(self):
        import tvm

        return tvm.target.Target(self.config["host"])


def preset_for(device: str) -> DevicePreset | None:
    """The preset of `--device` (a name or a TVM target JSON); None for cpu/llvm/cuda."""
    name = device.strip()
    if name.startswith("{"):
        return _json_preset(name)
    if name.lower() == "vulkan":
        raise MlccError(STAGE, "--device vulkan: the installed TVM (PyPI apache-tvm) has no "
                        "SPIR-V code generator (global function target.build.vulkan is "
                        "missing); build TVM from source with USE_VULKAN=ON, or use --device "
                        "opencl, metal or webgpu")
    return PRESETS.get(name.lower())


def _json_preset(text: str) -> DevicePreset:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise MlccError(STAGE, f"--device {text!r} is not valid JSON ({err}); give a TVM "
                        'target such as {"kind": "metal", "max_num_threads": 256}') from None
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind == "vulkan":
        return preset_for("vulkan")  # raises with the reason
    if kind not in GPU_KINDS:
        raise MlccError(STAGE, f"--device JSON kind {kind!r} is not built by the GPU backend; "
                        f"use one of {', '.join(GPU_KINDS)} (or --device cpu/cuda)")
    base = next(p for p in PRESETS.values() if p.kind == kind and not p.static_by_default)
    host = config.get("host", base.host)
    if isinstance(host, dict):
        host = host.get("mtriple", base.host)
    extra = tuple((k, v) for k, v in config.items()
                  if k not in ("kind", "host", "max_num_threads", "max_threads_per_block",
                               "max_shared_memory_per_block", "thread_warp_size",
                               "supports_float16"))
    return replace(base, name=f"{kind} (target JSON)", host=host,
                   max_threads_per_block=int(config.get(
                       "max_threads_per_block", config.get("max_num_threads",
                                                           base.max_threads_per_block))),
                   max_shared_memory_per_block=int(config.get(
                       "max_shared_memory_per_block", base.max_shared_memory_per_block)),
                   thread_warp_size=int(config.get("thread_warp_size", base.thread_warp_size)),
                   supports_fp16=bool(config.get("supports_float16", base.supports_fp16)),
                   extra=extra)


def check_host(host: str | None, device: str) -> None:
    if host is not None and host not in HOST_TRIPLES:
        raise MlccError(STAGE, f"--host {host!r} is not a known LLVM triple for --device "
                        f"{device}; use one of {', '.join(HOST_TRIPLES)}")


def default_prefix(model_type: str, quantization: str) -> str:
    """`llama_q4f16_1_`: a C identifier prefix naming the model."""
    return re.sub(r"\W", "_", f"{model_type}_{quantization}_")


def check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise MlccError(STAGE, f"--system-lib-prefix {prefix!r} is not a C identifier; use "
                        "letters, digits and underscores, such as llama_q4f16_1_")


def resolve_build_target(device: str, host: str | None, output: Path, model_type: str,
                         quantization: str, model_dtype: str,
                         system_lib_prefix: str | None) -> BuildTarget:
    """The build of a GPU preset, checked for impossible combinations before any work."""
    preset = preset_for(device)
    if preset is None:
        raise MlccError(STAGE, f"--device {device} is not a GPU preset")
    check_host(host, device)
    preset = replace(preset, host=host or preset.host)
    suffix = output.suffix
    if model_dtype == "float16" and not preset.supports_fp16:
        raise MlccError(STAGE, f"--device {device}: {preset.kind} has no float16 here (WebGPU "
                        f"needs the shader-f16 extension), so {quantization} cannot run; use "
                        "q4f32_1 or q0f32")
    if suffix == ".tar":
        prefix = system_lib_prefix
        if prefix is None and preset.static_by_default:
            prefix = default_prefix(model_type, quantization)
    else:
        prefix = system_lib_prefix
    if prefix is not None:
        check_prefix(prefix)
    target = BuildTarget(preset, suffix, prefix, tvm_config(preset))
    check_toolchain(device, target)
    return target


def check_cpu_output(host: str | None, suffix: str) -> None:
    """The CPU backend's outputs: objects for any known triple, linked libraries where a linker
    for the host exists."""
    check_host(host, "cpu")
    if suffix not in SUFFIXES:
        raise MlccError(STAGE, f"-o *{suffix or '(no suffix)'}: the suffix chooses the artifact; "
                        f"use one of {', '.join(SUFFIXES)}")
    if suffix == ".tar":
        return
    triple = host or native_triple()
    if suffix == ".wasm":
        if not triple.startswith("wasm32"):
            raise MlccError(STAGE, f"--device cpu -o *.wasm: a .wasm needs --host "
                            f"wasm32-unknown-unknown-wasm (the host is {triple}); use .so or .tar")
        wasm_runtime_parts("cpu")
        return
    if triple.startswith("wasm32"):
        raise MlccError(STAGE, f"--device cpu -o *{suffix}: host {triple} links only into a "
                        ".wasm (emscripten) or a .tar of objects; use -o lib.wasm or lib.tar")
    shared_linker("cpu", triple, suffix)


def tvm_config(preset: DevicePreset) -> dict:
    config: dict[str, Any] = {"kind": preset.kind, "max_num_threads": preset.max_threads_per_block,
                              "max_shared_memory_per_block": preset.max_shared_memory_per_block,
                              "thread_warp_size": preset.thread_warp_size}
    if preset.kind != "webgpu":
        config["max_threads_per_block"] = preset.max_threads_per_block
    config.update(dict(preset.extra))
    config["host"] = host_config(preset.host)
    return config


def host_config(triple: str) -> dict:
    config: dict[str, Any] = {"kind": "llvm", "mtriple": triple}
    if triple.startswith(("arm64-apple", "aarch64")):
        config["mattr"] = ["+neon"]
    return config


def native_triple() -> str:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                          platform.machine().lower())
    return f"{machine}-linux-gnu" if platform.system() == "Linux" else ""


def check_toolchain(device: str, target: BuildTarget) -> None:
    """Fail at once when the output needs a linker or library this machine lacks."""
    preset, suffix = target.preset, target.suffix
    what = f"--device {device} -o *{suffix}"
    if suffix not in SUFFIXES:
        raise MlccError(STAGE, f"{what}: the suffix chooses the artifact; use one of "
                        f"{', '.join(SUFFIXES)}")
    if preset.kind == "rocm":
        find_rocm_toolchain(device)
    if suffix == ".tar":
        return
    host = preset.host
    if suffix == ".wasm":
        if not host.startswith("wasm32"):
            raise MlccError(STAGE, f"{what}: a .wasm needs --host wasm32-unknown-unknown-wasm "
                            f"(the host is {host}); use .tar or .so for this host")
        wasm_runtime_parts(device)
        return
    if host.startswith("wasm32"):
        raise MlccError(STAGE, f"{what}: host {host} links only into a .wasm (emscripten) or "
                        "a .tar of objects; use -o lib.wasm or lib.tar")
    shared_linker(device, host, suffix)


def shared_linker(device: str, host: str, suffix: str) -> None:
    """The shared-library linker of `host`, or a one-line error naming what is missing."""
    what = f"--device {device} -o *{suffix}"
    if "apple" in host:
        if suffix not in (".dylib", ".so"):
            raise MlccError(STAGE, f"{what}: host {host} makes .dylib (or .so) libraries; use "
                            "-o lib.dylib, or .tar for an app's static link")
        if not shutil.which("xcrun"):
            raise MlccError(STAGE, f"{what}: linking a Mach-O library for {host} needs Xcode "
                            "(xcrun clang, and metal/metallib for precompiled shaders), which "
                            "this machine lacks; use -o lib.tar (objects to link in Xcode)")
        return
    if "windows" in host:
        raise MlccError(STAGE, f"{what}: linking a .dll for {host} needs the MSVC toolchain "
                        "(link.exe and the Windows SDK), which this machine lacks; use -o "
                        "lib.tar and link the objects on Windows")
    if suffix != ".so":
        raise MlccError(STAGE, f"{what}: host {host} makes .so libraries; use -o lib.so or "
                        "lib.tar")
    if "android" in host:
        if not os.environ.get("TVM_NDK_CC"):
            raise MlccError(STAGE, f"{what}: linking a .so for {host} needs the Android NDK's "
                            "clang in TVM_NDK_CC, which is not set; set it, or use -o lib.tar "
                            "(objects for the app's static link)")
        return
    if host != native_triple():
        raise MlccError(STAGE, f"{what}: this machine ({native_triple() or platform.system()}) "
                        f"has no linker for {host}; use -o lib.tar and link on the target")


def find_rocm_toolchain(device: str) -> tuple[str, list[str]]:
    """(ld.lld path, device bitcode files) that ROCm code objects need."""
    lld = next((p for p in map(shutil.which, LLD_NAMES) if p and _lld_major(p) >= 19), None)
    if lld is None:
        raise MlccError(STAGE, f"--device {device}: AMD GPU code objects need ld.lld from LLVM "
                        "19 or newer (apt install lld-19), which this machine lacks; there is "
                        "no other output for rocm")
    rocm = os.environ.get("ROCM_PATH")
    folders = [Path(rocm, "amdgcn", "bitcode")] if rocm else []
    for folder in folders + list(ROCM_BITCODE_DIRS):
        files = [Path(folder) / f"{name}.bc" for name in ROCM_BITCODE]
        if all(f.is_file() for f in files):
            return lld, [str(f) for f in files]
    raise MlccError(STAGE, f"--device {device}: AMD GPU code needs the ROCm device libraries "
                    "(ocml.bc, ockl.bc, oclc_*.bc in ROCM_PATH/amdgcn/bitcode), which this "
                    "machine lacks; install ROCm or Debian's rocm-device-libs")


def _lld_major(path: str) -> int:
    import subprocess

    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"LLD (\d+)", done.stdout)
    return int(found.group(1)) if found else 0


def wasm_runtime_parts(device: str) -> list[str]:
    """emcc and the TVM web runtime bitcode that a .wasm links with."""
    if not shutil.which("emcc"):
        raise MlccError(STAGE, f"--device {device} -o *.wasm: linking a WebAssembly module needs "
                        "emscripten (emcc), which this machine lacks; install it (apt install "
                        "emscripten) or use -o lib.tar (wasm32 objects and WGSL kernels)")
    home = os.environ.get("TVM_HOME")
    names = ("wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc")
    if home:
        found = [Path(home) / "web" / "dist" / "wasm" / n for n in names]
        if all(p.is_file() for p in found):
            return [str(p) for p in found]
    raise MlccError(STAGE, f"--device {device} -o *.wasm: the .wasm links with TVM's web runtime "
                    "(web/dist/wasm/wasm_runtime.bc, tvmjs_support.bc, webgpu_runtime.bc under "
                    "TVM_HOME), which is not built here, and the apache-tvm wheel cannot build "
                    "it (its include/ lacks tvm/support/io.h and 3rdparty/compiler-rt); build "
                    "it in a TVM source checkout (make -C web) and set TVM_HOME, or use "
                    "-o lib.tar")
