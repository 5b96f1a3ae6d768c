"""stories260K compiled for the other targets: artifacts checked from their file formats.

Nothing here can run on these devices, so each artifact is read as a file: the object headers
name the right machine, every exported symbol of a phone build carries the model's prefix, the
device source of every kernel is in the library, warp shuffles and float16 appear only where the
target has them, the OpenCL C validates with clang where clang is installed, and the ROCm code
object is an AMD GPU ELF for gfx942 that defines every kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from artifact_readers import (
    EM_AARCH64,
    EM_AMDGPU,
    MACHO_ARM64,
    embedded_elves,
    embedded_strings,
    exported_symbols,
    nm_tool,
    object_format,
)

from mlcc.errors import MlccError
from mlcc.interface.compile import compile_model

pytestmark = pytest.mark.slow
STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
PREFIX = "llama_q4f16_1_"
# device -> (quantization, output file); iphone and android default to the model's prefix
BUILDS = {"iphone": ("q4f16_1", "iphone.tar"), "android": ("q4f16_1", "android.tar"),
          "metal": ("q4f16_1", "metal.tar"), "opencl": ("q4f16_1", "opencl.so"),
          "rocm": ("q4f16_1", "rocm.so"), "webgpu": ("q4f32_1", "webgpu.tar")}
KERNEL_DECL = {"metal": rb"kernel void (\w+)\(", "opencl": rb"__kernel void (\w+)\(",
               "webgpu": rb"\bfn (\w+)\("}
SHUFFLES = re.compile(rb"simd_shuffle|simd_sum|sub_group|subgroup|__shfl")
# Weak definitions of the compiler runtime's float16 conversions that the code generator adds
# (LLVM calls them by these ABI names, so they cannot take the prefix); being weak, copies from
# several models merge at link time instead of clashing (test_targets_static_link.py links two).
WEAK_BUILTINS = {"__extendhfsf2", "__truncsfhf2"}


def rocm_ready() -> bool:
    from mlcc.backends.targets import find_rocm_toolchain

    try:
        find_rocm_toolchain("rocm")
    except MlccError:
        return False
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("targets")
    paths = {}
    for device, (quantization, name) in BUILDS.items():
        if device == "rocm" and not rocm_ready():
            continue
        compile_model(STORIES, out / name, quantization=quantization, device=device)
        paths[device] = out / name
    return paths


def tar_objects(path: Path, into: Path) -> list[Path]:
    with tarfile.open(path) as tar:
        tar.extractall(into)
    return sorted(into.glob("*.o"))


@pytest.mark.parametrize("device, fmt, machine", [
    ("iphone", "macho", MACHO_ARM64), ("metal", "macho", MACHO_ARM64),
    ("android", "elf", EM_AARCH64), ("webgpu", "wasm", 1)])
def test_tar_holds_objects_for_the_target_triple(built, tmp_path, device, fmt, machine):
    objects = tar_objects(built[device], tmp_path)
    assert len(objects) == 2  # host code, and the device code blob
    for obj in objects:
        assert object_format(obj.read_bytes()[:64]) == (fmt, machine), obj.name


@pytest.mark.parametrize("device", ["iphone", "android"])
def test_every_exported_symbol_of_a_phone_build_carries_the_prefix(built, tmp_path, device):
    objects = tar_objects(built[device], tmp_path)
    names = {obj.name for obj in objects}
    assert names == {"lib0.o", f"{PREFIX}devc.o"}
    symbols = [s for obj in objects for s in exported_symbols(obj)]
    strong = [name for name, weak in symbols if not weak]
    assert f"__tvm_ffi_{PREFIX}prefill" in strong and f"__tvm_ffi_{PREFIX}decode" in strong
    assert f"__tvm_ffi_{PREFIX}mlcc_metadata" in strong
    assert f"{PREFIX}__tvm_ffi__library_bin" in strong
    assert all(PREFIX in name for name in strong), [n for n in strong if PREFIX not in n]
    assert {name for name, weak in symbols if weak and PREFIX not in name} <= WEAK_BUILTINS


def device_text(device: str, path: Path, tmp_path: Path) -> tuple[bytes, list[str]]:
    """(the bytes holding the device code, host kernel functions) of a built library."""
    if path.suffix == ".tar":
        objects = tar_objects(path, tmp_path)
        blob = next(o for o in objects if o.name.endswith("devc.o")).read_bytes()
        host = next(o for o in objects if o.name == "lib0.o")
        symbols = [name for name, _ in exported_symbols(host)]
    else:
        blob = path.read_bytes()
        out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True,
                             text=True, check=True).stdout
        symbols = [line.split()[-1] for line in out.splitlines()]
    kernels = sorted({m.group(1) for s in symbols
                      if (m := re.fullmatch(r"__tvm_ffi_(\w*k\d+_[a-z_]+)", s))})
    return blob, kernels


@pytest.mark.parametrize("device, language", [
    ("iphone", "metal"), ("metal", "metal"), ("android", "opencl"), ("opencl", "opencl"),
    ("webgpu", "webgpu")])
def test_device_source_of_every_kernel_is_in_the_library(built, tmp_path, device, language):
    if device == "webgpu" and nm_tool() is None:
        pytest.skip("needs llvm-nm to read wasm symbol tables")
    blob, kernels = device_text(device, built[device], tmp_path)
    assert len(kernels) >= 15  # q_linear, norms, attention, ... for prefill and decode
    device_kernels = {m.decode() for m in re.findall(KERNEL_DECL[language], blob)}
    for kernel in kernels:
        assert any(k.startswith(kernel + "_kernel") for k in device_kernels), kernel
    if device in ("iphone", "android", "opencl", "webgpu"):  # warp size 1: shared memory only
        assert not SHUFFLES.search(blob)
    if device == "webgpu":  # no shader-f16: float32 everywhere
        assert b"f16" not in blob and b"f32" in blob


@pytest.mark.skipif(shutil.which("clang-14") is None and shutil.which("clang") is None,
                    reason="needs clang to validate OpenCL C")
@pytest.mark.parametrize("device", ["opencl", "android"])
def test_opencl_source_validates_with_clang(built, tmp_path, device):
    blob, _ = device_text(device, built[device], tmp_path / "objs")
    sources = embedded_strings(blob, b"__kernel void")
    assert len(sources) == 1
    source = tmp_path / "kernels.cl"
    source.write_text(sources[0])
    clang = shutil.which("clang-14") or shutil.which("clang")
    for std in ("CL1.2", "CL2.0"):
        done = subprocess.run([clang, "-target", "spir64", f"-cl-std={std}", "-Xclang",
                               "-finclude-default-header", "-fsyntax-only", str(source)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[:2000]


def test_rocm_library_holds_a_gfx942_code_object_with_every_kernel(built, tmp_path):
    if "rocm" not in built:
        with pytest.raises(MlccError, match=r"--device rocm: .*(ld\.lld|ROCm device)") as err:
            compile_model(STORIES, tmp_path / "rocm.so", quantization="q4f16_1", device="rocm")
        assert "\n" not in str(err.value)
        return
    blob, kernels = device_text("rocm", built["rocm"], tmp_path)
    objects = [e for e in embedded_elves(blob) if object_format(e[:64]) == ("elf", EM_AMDGPU)]
    assert len(objects) == 1
    code = objects[0]
    assert code[7] == 64  # ELFOSABI_AMDGPU_HSA
    flags = int.from_bytes(code[48:52], "little")
    assert flags & 0xFF == 0x4C  # EF_AMDGPU_MACH_AMDGCN_GFX942
    path = tmp_path / "kernels.co"
    path.write_bytes(code)
    defined = {name for name, _ in exported_symbols(path)}
    for kernel in kernels:
        assert any(d.startswith(kernel + "_kernel") for d in defined), kernel
        assert any(d.startswith(kernel + "_kernel") and d.endswith(".kd") for d in defined)


def test_webgpu_wasm_is_built_or_refused_in_one_line(built, tmp_path):
    out = tmp_path / "webgpu.wasm"
    try:
        compile_model(STORIES, out, quantization="q4f32_1", device="webgpu")
    except MlccError as err:
        assert "\n" not in str(err)
        assert re.search(r"emcc|TVM_HOME", str(err)) and "lib.tar" in str(err)
        assert not out.exists()
        return
    assert out.read_bytes()[:4] == b"\0asm"


WGSL_BYTES = {"f32": 4, "i32": 4, "u32": 4, "f16": 2}


def wgsl_kernel_limits(blob: bytes) -> list[tuple[str, int, int]]:
    """(kernel, threads per workgroup, workgroup memory bytes) of every WGSL kernel."""
    out = []
    for chunk in blob.split(b"// Function: ")[1:]:
        name = chunk.split(b"\n", 1)[0].decode()
        size = re.search(rb"@workgroup_size\((\d+), (\d+), (\d+)\)", chunk)
        if size is None:  # a header without a body
            continue
        threads = int(size.group(1)) * int(size.group(2)) * int(size.group(3))
        shared = sum(int(n) * WGSL_BYTES[t.decode()] for t, n in re.findall(
            rb"var<workgroup> \w+ *: *array<(\w+), *(\d+)>", chunk))
        out.append((name, threads, shared))
    return out


def test_webgpu_kernels_stay_within_the_workgroup_limits(built, tmp_path):
    """The preset's 256 threads / 16 KB, and a target JSON's tighter 64 threads / 4 KB."""
    blob, kernels = device_text("webgpu", built["webgpu"], tmp_path / "preset")
    limits = wgsl_kernel_limits(blob)
    assert len(limits) >= len(kernels)
    assert all(t <= 256 and s <= 16384 for _, t, s in limits), limits
    tight = tmp_path / "tight.tar"
    compile_model(STORIES, tight, quantization="q4f32_1",
                  device='{"kind": "webgpu", "max_num_threads": 64, '
                         '"max_shared_memory_per_block": 4096}')
    blob, _ = device_text("webgpu", tight, tmp_path / "tight")
    limits = wgsl_kernel_limits(blob)
    assert max(t for _, t, _ in limits) == 64 and all(s <= 4096 for _, _, s in limits), limits
