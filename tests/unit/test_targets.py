"""Device presets, host triples and suffix rules: what each build targets, and one-line refusals.

Every impossible combination must fail before any work with one line that names the missing
piece and the alternative. The checks that depend on this machine's tools (emcc, ld.lld, the
Android NDK, Xcode) are run with those tools hidden or present as the test arranges.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlcc.backends import targets
from mlcc.backends.targets import PRESETS, preset_for, resolve_build_target
from mlcc.errors import MlccError
from mlcc.interface.compile import check_output, resolve_device


def build(device: str, output: str, quantization: str = "q4f16_1", host: str | None = None,
          prefix: str | None = None):
    dtype = "float32" if quantization in ("q4f32_1", "q0f32") else "float16"
    return resolve_build_target(device, host, Path(output), "llama", quantization, dtype, prefix)


def refused(device: str, output: str, **kw) -> str:
    with pytest.raises(MlccError) as err:
        build(device, output, **kw)
    text = str(err.value)
    assert text.startswith("[compile] ") and "\n" not in text
    return text


def test_presets_carry_their_limits_and_hosts():
    iphone, webgpu, rocm = PRESETS["iphone"], PRESETS["webgpu"], PRESETS["rocm"]
    assert (iphone.kind, iphone.host, iphone.thread_warp_size) == ("metal", "arm64-apple-ios", 1)
    assert PRESETS["android"].host == "aarch64-linux-android"
    assert PRESETS["metal"].host == "arm64-apple-darwin"
    assert (webgpu.max_threads_per_block, webgpu.max_shared_memory_per_block) == (256, 16384)
    assert not webgpu.supports_fp16 and all(
        p.supports_fp16 for p in PRESETS.values() if p.name != "webgpu")
    assert rocm.thread_warp_size == 64
    config = targets.tvm_config(webgpu)
    assert config["kind"] == "webgpu" and config["max_num_threads"] == 256
    assert "max_threads_per_block" not in config  # not an option of TVM's webgpu kind
    assert config["host"]["mtriple"] == "wasm32-unknown-unknown-wasm"
    assert targets.tvm_config(rocm)["mcpu"] == "gfx942"


def test_phone_tar_gets_the_model_prefix_by_default():
    assert build("iphone", "lib.tar").system_lib_prefix == "llama_q4f16_1_"
    assert build("android", "lib.tar").system_lib_prefix == "llama_q4f16_1_"
    assert build("iphone", "lib.tar", prefix="app_").system_lib_prefix == "app_"
    assert build("metal", "lib.tar").system_lib_prefix is None  # a Mac app loads the library
    assert build("iphone", "lib.tar", host="arm64-apple-darwin").preset.host == \
        "arm64-apple-darwin"


def test_target_json_takes_its_own_limits():
    text = json.dumps({"kind": "opencl", "max_num_threads": 128, "thread_warp_size": 1,
                       "host": {"kind": "llvm", "mtriple": "aarch64-linux-android"}})
    target = build(text, "lib.tar")
    assert target.preset.kind == "opencl" and target.preset.max_threads_per_block == 128
    assert target.config["host"]["mtriple"] == "aarch64-linux-android"
    assert resolve_device(text) == text
    assert resolve_device("IPhone") == "iphone"


@pytest.mark.parametrize("device, output, kw, words", [
    ("webgpu", "lib.tar", {}, ["q4f16_1", "shader-f16", "q4f32_1"]),
    ("metal", "lib.dylib", {}, ["Xcode", "-o lib.tar"]),
    ("iphone", "lib.so", {}, ["Xcode", "-o lib.tar"]),
    ("android", "lib.so", {}, ["TVM_NDK_CC", "-o lib.tar"]),
    ("opencl", "lib.dll", {"host": "x86_64-pc-windows-msvc"}, ["MSVC", "lib.tar"]),
    ("metal", "lib.wasm", {}, ["wasm32-unknown-unknown-wasm", ".tar"]),
    ("webgpu", "lib.so", {"quantization": "q4f32_1"}, [".wasm", "lib.tar"]),
    ("opencl", "lib.so", {"host": "aarch64-linux-gnu"}, ["no linker", "lib.tar"]),
    ("opencl", "lib.so", {"host": "sparc-sun-solaris"}, ["--host", "x86_64-linux-gnu"]),
    ("android", "lib.tar", {"prefix": "my-app"}, ["C identifier"]),
    ("opencl", "lib.zip", {}, ["suffix", ".tar"]),
])
def test_impossible_combinations_fail_in_one_line(monkeypatch, device, output, kw, words):
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    monkeypatch.setattr(targets.shutil, "which", lambda name, *a, **k: None
                        if name in ("xcrun", "emcc") else f"/usr/bin/{name}")
    text = refused(device, output, **kw)
    for word in words:
        assert word in text, (word, text)


def test_vulkan_names_the_missing_spirv_codegen():
    for device in ("vulkan", '{"kind": "vulkan"}'):
        with pytest.raises(MlccError, match="no SPIR-V code generator.*target.build.vulkan.*"
                           "opencl, metal or webgpu") as err:
            preset_for(device)
        assert "\n" not in str(err.value)


def test_bad_device_names_and_json_are_refused():
    with pytest.raises(MlccError, match="unknown; use cpu/llvm, cuda, or one of rocm, metal"):
        resolve_device("tpu")
    with pytest.raises(MlccError, match="not valid JSON"):
        resolve_device("{kind: metal}")
    with pytest.raises(MlccError, match="kind 'hexagon' is not built by the GPU backend"):
        resolve_device('{"kind": "hexagon"}')


def test_wasm_names_emcc_then_the_web_runtime(monkeypatch, tmp_path):
    monkeypatch.setattr(targets.shutil, "which", lambda name, *a, **k: None)
    assert "emscripten (emcc)" in refused("webgpu", "lib.wasm", quantization="q4f32_1")
    monkeypatch.setattr(targets.shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    monkeypatch.setenv("TVM_HOME", str(tmp_path))
    text = refused("webgpu", "lib.wasm", quantization="q4f32_1")
    assert "wasm_runtime.bc" in text and "TVM_HOME" in text
    dist = tmp_path / "web" / "dist" / "wasm"
    dist.mkdir(parents=True)
    for name in ("wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc"):
        (dist / name).write_bytes(b"BC")
    assert build("webgpu", "lib.wasm", quantization="q4f32_1").suffix == ".wasm"


def test_rocm_names_ld_lld_and_the_device_libraries(monkeypatch):
    monkeypatch.setattr(targets.shutil, "which", lambda name, *a, **k: None)
    assert "ld.lld from LLVM 19" in refused("rocm", "lib.so")
    monkeypatch.setattr(targets.shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    monkeypatch.setattr(targets, "_lld_major", lambda path: 19)
    monkeypatch.setattr(targets, "ROCM_BITCODE_DIRS", ("/nonexistent",))
    monkeypatch.delenv("ROCM_PATH", raising=False)
    assert "ocml.bc" in refused("rocm", "lib.so")


def test_cpu_and_cuda_outputs_are_checked_the_same_way(monkeypatch):
    native = targets.native_triple()
    check_output("llvm", "cpu", None, Path("lib.so"), "llama", "q4f16_1", "float16", None)
    check_output("llvm", "cpu", "aarch64-linux-android", Path("lib.tar"), "llama", "q4f16_1",
                 "float16", "app_")
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(MlccError, match="Android NDK"):
        check_output("llvm", "cpu", "aarch64-linux-android", Path("lib.so"), "llama",
                     "q4f16_1", "float16", None)
    with pytest.raises(MlccError, match=f"host {native} makes .so libraries"):
        check_output("llvm", "cpu", None, Path("lib.dylib"), "llama", "q4f16_1", "float16",
                     None)
    with pytest.raises(MlccError, match="CUDA backend writes a shared library"):
        check_output("cuda", "cuda", None, Path("lib.tar"), "llama", "q4f16_1", "float16", None)
    assert check_output("iphone", "iphone", None, Path("lib.tar"), "llama", "q4f16_1",
                        "float16", None).system_lib_prefix == "llama_q4f16_1_"
