"""CUDA build toolchain: the target, compiled device code at build time, injected device source.

Kernels are CUDA C++ device functions (generated per kernel spec) that TVM launches from
thread-bound PrimFuncs through `T.call_extern`; their text is inserted into TVM's CUDA source by
the `tvm_callback_cuda_postproc` hook, just before the first kernel TVM emits. The whole device
source is compiled once by nvcc into a fatbin for the requested architectures, so the library
loads on the GPU machine with the TVM runtime alone and nothing compiles at load time.

A machine without a CUDA driver (the usual build box) cannot load `libtvm_runtime_cuda.so`,
which TVM needs to compile device code at build time. `enable_cuda_codegen()` then builds a stub
`libcuda.so.1` whose driver entry points only return an error, loads it, then loads the CUDA
runtime library; no CUDA call is ever made during a build.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlcc.errors import MlccError

STAGE = "compile"
DEFAULT_ARCHS = ("sm_90",)
# Driver symbols libtvm_runtime_cuda.so imports from libcuda.so.1 (nm -D --undefined-only).
DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                  "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData",
                  "cuModuleUnload", "cuTensorMapEncodeTiled")
_STATE: dict[str, object] = {}


def cuda_target(arch: str = DEFAULT_ARCHS[0]):
    """The TVM target: CUDA kernels for `arch`, host code for this machine's CPU."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": 49152, "thread_warp_size": 32,
                              "host": {"kind": "llvm"}})


def host_target():
    import tvm

    return tvm.target.Target({"kind": "llvm"})


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if not nvcc:
        raise MlccError(STAGE, "--device cuda needs nvcc (the CUDA toolkit) on PATH to compile "
                        "device code at build time; install the CUDA toolkit or add it to PATH")
    return nvcc


def _stub_driver(folder: Path) -> Path:
    """A libcuda.so.1 whose entry points return CUDA_ERROR_NO_DEVICE (100)."""
    lib = folder / "libcuda.so.1"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "stub.c"
    source.write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in DRIVER_SYMBOLS))
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise MlccError(STAGE, "building for CUDA on a machine without a GPU driver needs a C "
                        "compiler (gcc) for a stub libcuda.so.1; install gcc")
    partial = folder / f".libcuda.so.1.{os.getpid()}"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(partial),
                    str(source)], check=True, capture_output=True)
    os.replace(partial, lib)
    return lib


def enable_cuda_codegen() -> None:
    """Make `tvm.compile` produce compiled device code here (once per process)."""
    if _STATE.get("enabled"):
        return
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlcc"
        ctypes.CDLL(str(_stub_driver(cache / "cuda-stub")), mode=ctypes.RTLD_GLOBAL)
    try:
        load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_GLOBAL",
                        extra_lib_paths=tvm.libinfo.package_lib_paths())
    except OSError as err:
        raise MlccError(STAGE, f"cannot load libtvm_runtime_cuda.so ({err}); the CUDA backend "
                        "needs the apache-tvm wheel's CUDA runtime and libcudart.so.13") from None
    _STATE["enabled"] = True


def install_hooks(device_source: str, archs: tuple[str, ...], keep_source: Path | None) -> None:
    """Register the postproc (insert our device code) and compile (nvcc -> fatbin) callbacks."""
    import tvm_ffi

    nvcc = find_nvcc()

    def postproc(code: str, target=None) -> str:
        marker = code.find('extern "C" __global__')
        at = marker if marker >= 0 else len(code)
        code = code[:at] + device_source + "\n" + code[at:]
        if keep_source is not None:
            keep_source.write_text(code)
        return code

    def compile_fatbin(code: str, target=None) -> bytearray:
        return bytearray(compile_source(code, archs, nvcc))

    tvm_ffi.register_global_func("tvm_callback_cuda_postproc", postproc, override=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_fatbin, override=True)


def compile_source(code: str, archs: tuple[str, ...], nvcc: str | None = None,
                   fmt: str = "fatbin") -> bytes:
    """nvcc `code` into a fatbin (or cubin/ptx) holding machine code for every arch."""
    nvcc = nvcc or find_nvcc()
    gencode = []
    for arch in archs:
        digits = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{digits},code=sm_{digits}"]
    with tempfile.TemporaryDirectory(prefix="mlcc-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{fmt}"
        src.write_text(code)
        done = subprocess.run([nvcc, f"--{fmt}", "-O3", "-std=c++17", "-w", *gencode, "-o",
                               str(out), str(src)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln),
                         done.stderr.strip()[:300])
            raise MlccError(STAGE, f"nvcc failed on the generated CUDA source: {first}; keep the "
                            "source with MLCC_CUDA_KEEP_SOURCE=path to inspect it")
        return out.read_bytes()
