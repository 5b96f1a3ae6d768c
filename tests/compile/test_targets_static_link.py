"""Two models as .tar objects with different prefixes link into one C program and both answer.

stories260K is compiled twice for `--host x86_64-linux-gnu` as objects for static linking: once
for the CPU (q4f16_1, prefix storya_) and once for OpenCL (q0f32, prefix storyb_, so its objects
also carry a device blob). A small C program is linked from all four objects and calls each
model's exported metadata functions by symbol; it must link without duplicate symbols and
print each model's own metadata. The same objects, linked into one shared object, are found
through TVM's system-library registry under each prefix.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from mlcc.interface.compile import compile_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to link")]
STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
MODELS = {"storya_": ("cpu", "q4f16_1"), "storyb_": ("opencl", "q0f32")}

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

#define DECLARE(p)                                                                       \
  int __tvm_ffi_##p##mlcc_metadata_nbytes(void*, const TVMFFIAny*, int32_t, TVMFFIAny*); \
  int __tvm_ffi_##p##mlcc_metadata(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);
DECLARE(storya_)
DECLARE(storyb_)

/* Prints "<label> <metadata JSON>" using the model's two exported functions. */
static int show(const char* label, TVMFFISafeCallType nbytes_fn, TVMFFISafeCallType meta_fn) {
  TVMFFIAny result;
  memset(&result, 0, sizeof(result));
  if (nbytes_fn(NULL, NULL, 0, &result) != 0 || result.type_index != kTVMFFIInt) return 1;
  int64_t n = result.v_int64;
  int64_t padded = (n + 64) / 64 * 64;
  char* text = aligned_alloc(64, padded);
  memset(text, 0, padded);
  int64_t shape[1] = {n};
  DLTensor tensor;
  memset(&tensor, 0, sizeof(tensor));
  tensor.data = text;
  tensor.device.device_type = kDLCPU;
  tensor.ndim = 1;
  tensor.dtype.code = kDLUInt;
  tensor.dtype.bits = 8;
  tensor.dtype.lanes = 1;
  tensor.shape = shape;
  TVMFFIAny arg;
  memset(&arg, 0, sizeof(arg));
  arg.type_index = kTVMFFIDLTensorPtr;
  arg.v_ptr = &tensor;
  memset(&result, 0, sizeof(result));
  if (meta_fn(NULL, &arg, 1, &result) != 0) return 1;
  printf("%s %s\n", label, text);
  free(text);
  return 0;
}

int main(void) {
  if (show("storya_", __tvm_ffi_storya_mlcc_metadata_nbytes, __tvm_ffi_storya_mlcc_metadata))
    return 1;
  if (show("storyb_", __tvm_ffi_storyb_mlcc_metadata_nbytes, __tvm_ffi_storyb_mlcc_metadata))
    return 1;
  return 0;
}
"""


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("static")
    found = {}
    for prefix, (device, quantization) in MODELS.items():
        tar = root / f"{prefix}lib.tar"
        compile_model(STORIES, tar, quantization=quantization, device=device,
                      host="x86_64-linux-gnu", system_lib_prefix=prefix)
        with tarfile.open(tar) as archive:
            archive.extractall(root / prefix)
        found[prefix] = sorted((root / prefix).glob("*.o"))
    return found


def test_every_strong_symbol_carries_its_model_prefix(objects):
    for prefix, paths in objects.items():
        for path in paths:
            out = subprocess.run(["nm", "-g", "--defined-only", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            strong = [line.split()[-1] for line in out.splitlines()
                      if line.split()[-2] not in ("W", "V", "w", "v")]
            assert strong and all(prefix in name for name in strong), (path.name, strong)


def runtime_dirs() -> tuple[Path, Path, Path]:
    """(tvm_ffi include folder, tvm_ffi lib folder, tvm lib folder)."""
    import tvm
    import tvm_ffi

    ffi = Path(tvm_ffi.__file__).parent
    return ffi / "include", ffi / "lib", Path(tvm.__file__).parent / "lib"


def test_objects_of_two_models_link_into_one_program(objects, tmp_path):
    assert [p.name for p in objects["storya_"]] == ["lib0.o"]
    assert [p.name for p in objects["storyb_"]] == ["lib0.o", "storyb_devc.o"]
    include, ffi_lib, tvm_lib = runtime_dirs()
    source = tmp_path / "main.c"
    source.write_text(PROGRAM)
    program = tmp_path / "two_models"
    objs = [str(p) for paths in objects.values() for p in paths]
    link = subprocess.run(
        ["gcc", "-std=c11", "-o", str(program), str(source), *objs, f"-I{include}",
         f"-L{ffi_lib}", f"-L{tvm_lib}", "-ltvm_ffi", "-ltvm_runtime", "-lm",
         f"-Wl,-rpath,{ffi_lib}", f"-Wl,-rpath,{tvm_lib}"],
        capture_output=True, text=True, check=False)
    assert link.returncode == 0, link.stderr[-3000:]
    run = subprocess.run([str(program)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert sorted(lines) == ["storya_", "storyb_"]
    for prefix, (device, quantization) in MODELS.items():
        meta = json.loads(lines[prefix])
        assert meta["model_type"] == "llama" and meta["quantization"] == quantization
        assert meta["device"] == ("llvm" if device == "cpu" else device)
        first = "model.embed_tokens.weight" if quantization == "q0f32" else \
            "model.embed_tokens.q_weight"
        assert meta["params"][0]["name"] == first


def test_system_library_registry_finds_each_model_by_prefix(objects, tmp_path):
    """Both models in one shared object: the CPU model answers through the registry; the OpenCL
    model's lookup reaches its device blob, which asks for the OpenCL runtime (not in the wheel)."""
    import tvm

    shared = tmp_path / "both.so"
    objs = [str(p) for paths in objects.values() for p in paths]
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shared), *objs], check=True)
    ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)  # its constructors register the symbols
    lib = tvm.runtime.system_lib("storya_")
    nbytes = lib["mlcc_metadata_nbytes"]()
    out = tvm.runtime.empty((nbytes,), "uint8")
    lib["mlcc_metadata"](out)
    meta = json.loads(bytes(out.numpy()).decode())
    assert meta["quantization"] == "q4f16_1"
    assert {"prefill", "decode"} <= set(meta["entries"])
    with pytest.raises(Exception, match="opencl"):
        tvm.runtime.system_lib("storyb_")["mlcc_metadata_nbytes"]()
