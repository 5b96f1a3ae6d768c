"""Write a compiled GPU library as the artifact its suffix names, with the host's linker.

    .tar    object files (host code for the host triple + the device blob), no linking
    .so     linked here with the host C compiler (this machine's triple), or the Android NDK's
            clang from TVM_NDK_CC for aarch64-linux-android
    .dylib  Xcode's clang (xcrun) on a Mac
    .wasm   emscripten with TVM's web runtime (TVM_HOME/web/dist/wasm)

`mlcc.backends.targets.check_toolchain` has already refused the combinations this machine cannot
link, so each branch here finds what it needs.
"""

from __future__ import annotations

from pathlib import Path

from mlcc.backends.targets import BuildTarget, find_rocm_toolchain, wasm_runtime_parts


def export(executable, path: Path, target: BuildTarget) -> None:
    suffix, host = target.suffix, target.preset.host
    if suffix == ".tar":
        executable.export_library(str(path))
    elif suffix == ".wasm":
        from tvm.support import emcc

        wasm_runtime_parts(target.preset.name)
        executable.export_library(str(path), fcompile=emcc.create_tvmjs_wasm)
    elif suffix == ".dylib":
        from tvm.support import xcode

        executable.export_library(str(path), fcompile=xcode.create_dylib, arch="arm64",
                                  sdk="iphoneos" if "ios" in host else "macosx")
    elif "android" in host:
        from tvm.support import ndk

        executable.export_library(str(path), fcompile=ndk.create_shared)
    else:
        executable.export_library(str(path))


def install_rocm_hooks() -> None:
    """Point TVM's ROCm code generation at this machine's device bitcode and ld.lld."""
    import subprocess
    import tempfile

    import tvm_ffi

    lld, bitcode = find_rocm_toolchain("rocm")

    def bitcode_path(rocdl_dir=None) -> list[str]:
        return bitcode

    def link(obj: bytes) -> bytearray:
        with tempfile.TemporaryDirectory(prefix="mlcc-rocm-") as tmp:
            src, out = Path(tmp) / "kernels.o", Path(tmp) / "kernels.co"
            src.write_bytes(bytes(obj))
            subprocess.run([lld, "-shared", str(src), "-o", str(out)], check=True,
                           capture_output=True)
            return bytearray(out.read_bytes())

    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_path, override=True)
    tvm_ffi.register_global_func("tvm_callback_rocm_link", link, override=True)
