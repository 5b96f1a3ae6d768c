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

Programmatic dependent launch (`pdl`, sm_90 and newer): every kernel is launched with the
attribute that lets the driver start it before the kernel ahead of it in the stream has
completed, and it waits (`griddepcontrol.wait`) before its first read of an activation or any
write: that returns once the kernel ahead has finished and its writes are visible, so the order
of all reads and writes stays as before. The decode GEMVs issue their weight loads before the
wait, the decode attention its first cached keys and values. A kernel is released to run early when every block of the kernel ahead has exited, or
sooner where that kernel says so (`griddepcontrol.launch_dependents`): kernels whose next
kernel is a single block (the decode GEMVs ahead of a one-row norm) say so at their start, and
single-block kernels (the one-row norms, the argmax) right after their own wait returns: the
kernel ahead has finished by then, so the next one is placed on an idle GPU and its weight
loads overlap the one block's work (decode 1.01x interleaved on the H200; 1.01x in two more
calls together with the decode attention's early loads, at 16 to 3,968 positions;
benchmarks/results/2026-11-29-h200-i).
Letting every kernel go at its start was slower on the H200 (decode 454 against 522 tok/s,
prefill 15.2k against 17.2k; benchmarks/results/2026-11-29-h200-c): a grid placed while the one
ahead still holds SMs lands unevenly, several blocks on the SMs that freed first, which costs
the persistent and one-wave kernels more than the overlap saves. Even the one-row norms
releasing the GEMV after them at their start, while the GEMV ahead of them still ran, cost
decode 12% (476 against 540 tok/s). GEMVs that claim their
tiles from counters, so that placement does not matter, were still 10% slower released early
(benchmarks/results/2026-11-29-h200-f).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mlcc.backends.cuda.kernels import GRID_WAIT
from mlcc.errors import MlccError

STAGE = "compile"
DEFAULT_ARCHS = ("sm_90",)
# Driver symbols libtvm_runtime_cuda.so imports from libcuda.so.1 (nm -D --undefined-only).
DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                  "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData",
                  "cuModuleUnload", "cuTensorMapEncodeTiled")
_STATE: dict[str, object] = {}
PDL_PIPELINE = "mlcc_pdl"
PDL_TAG = "tirx.use_programtic_dependent_launch"  # sic: the TVM runtime's spelling
DYN_SHARED_TAG = "tirx.use_dyn_shared_memory"  # must stay the last launch tag
PDL_MIN_ARCH = 90
# kernels.GRID_WAIT goes at the start of every kernel when pdl is on, except in kernels that
# place it themselves (the decode GEMVs issue their first weight loads before it). The helpers
# (kernels.COMMON_SOURCE) are no-ops unless MLCC_PDL is defined and the arch is sm_90+.
EARLY_RELEASE = "mlcc_grid_launch();"  # first, in kernels followed by a single block
PDL_DEFINE = "#define MLCC_PDL 1\n"
_KERNEL_OPEN = re.compile(r'(extern "C" __global__[^;{]*\{)')


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


def pdl_supported(archs: tuple[str, ...]) -> bool:
    """Whether every architecture of the fatbin has griddepcontrol (sm_90 and newer)."""
    return all(int(re.sub(r"\D", "", arch) or 0) >= PDL_MIN_ARCH for arch in archs)


def with_pdl_prologue(code: str, self_waiting: frozenset[str] = frozenset(),
                      early: frozenset[str] = frozenset(),
                      after_wait: frozenset[str] = frozenset()) -> str:
    """TVM's kernel wrappers with the wait at the top of each body, except those calling a
    device function of `self_waiting` (which waits where it should); those calling one of
    `early` release the next kernel first, those calling one of `after_wait` right after the
    wait."""

    def opened(match: re.Match) -> str:
        body = code[match.end():code.find("\n}", match.end())]
        called = set(re.findall(r"\b(\w+)\s*\(", body))
        lines = [] if self_waiting & called else [GRID_WAIT]
        if early & called:
            lines = [EARLY_RELEASE] + lines
        elif after_wait & called and lines:
            lines = lines + [EARLY_RELEASE]
        return match.group(1) + "".join("\n  " + line for line in lines)

    return _KERNEL_OPEN.sub(opened, code)


def register_pdl_pipeline() -> str:
    """The name of a TIR pipeline: TVM's default one, then every device kernel tagged for
    launch with programmatic stream serialization (the runtime reads the tag)."""
    import tvm
    from tvm.tirx import compilation_pipeline as pipelines

    if PDL_PIPELINE in pipelines.PIPELINE_MAP:
        return PDL_PIPELINE

    def factory():
        base, finalize_host, finalize_device = pipelines.get_tir_pipeline("default")

        @tvm.transform.module_pass(opt_level=0, name="MlccTagPDL")
        def tagged(mod, _ctx):
            mod = base(mod)
            for gvar, func in list(mod.functions.items()):
                tags = func.attrs.get("tirx.kernel_launch_params") if func.attrs else None
                if tags is None:
                    continue
                tags = [str(t) for t in tags if str(t) != PDL_TAG]
                tail = [DYN_SHARED_TAG] if DYN_SHARED_TAG in tags else []
                tags = [t for t in tags if t != DYN_SHARED_TAG] + [PDL_TAG] + tail
                mod.update_func(gvar, func.with_attr("tirx.kernel_launch_params", tags))
            return mod

        return tagged, finalize_host, finalize_device

    pipelines.register_tir_pipeline(PDL_PIPELINE, factory)
    return PDL_PIPELINE


def with_min_blocks(code: str, min_blocks: Mapping[str, int]) -> str:
    """TVM's `__launch_bounds__(threads)` of each kernel named in `min_blocks` (declaration and
    definition) as `__launch_bounds__(threads, blocks)`."""
    for kernel, blocks in min_blocks.items():
        code, found = re.subn(rf"__launch_bounds__\((\d+)\) {re.escape(kernel)}\(",
                              rf"__launch_bounds__(\1, {int(blocks)}) {kernel}(", code)
        if not found:
            raise MlccError(STAGE, f"kernel {kernel}: no __launch_bounds__ in TVM's source to "
                            "add its minimum blocks per SM to; the CUDA codegen changed")
    return code


def install_hooks(device_source: str, archs: tuple[str, ...], keep_source: Path | None,
                  pdl: bool = False, self_waiting: frozenset[str] = frozenset(),
                  early: frozenset[str] = frozenset(),
                  min_blocks: Mapping[str, int] | None = None,
                  after_wait: frozenset[str] = frozenset()) -> None:
    """Register the postproc (insert our device code) and compile (nvcc -> fatbin) callbacks.

    With `pdl` every kernel wrapper waits for the kernel before it (with_pdl_prologue), except
    those calling a device function named in `self_waiting`; `early` names the device
    functions whose kernels release the next one at their start, `after_wait` those that
    release it right after their wait. `min_blocks` maps kernel names (TVM's
    `{launcher}_kernel`) to the blocks per SM their launch bound asks for."""
    import tvm_ffi

    nvcc = find_nvcc()

    def postproc(code: str, target=None) -> str:
        marker = code.find('extern "C" __global__')
        at = marker if marker >= 0 else len(code)
        head, kernels = code[:at], code[at:]
        if pdl:
            kernels = with_pdl_prologue(kernels, self_waiting, early, after_wait)
        if min_blocks:
            kernels = with_min_blocks(kernels, min_blocks)
        code = head + (PDL_DEFINE if pdl else "") + device_source + "\n" + kernels
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
