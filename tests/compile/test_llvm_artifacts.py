"""Artifacts other than .so: object tarballs with a system-lib prefix; a model mismatch refused."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from mlcc.errors import MlccError
from mlcc.interface.compile import compile_model
from mlcc.runtime_check.compiled import CompiledEngine

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


def test_tar_with_system_lib_prefix(tmp_path):
    out = tmp_path / "stories.tar"
    compile_model(STORIES, out, quantization="q4f16_1", system_lib_prefix="stories_q4_")
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert any(n.endswith(".o") for n in names)
        tar.extractall(tmp_path / "objs")
    symbols = subprocess.run(["nm", "-g", "--defined-only", *map(str, (tmp_path / "objs").glob("*.o"))],
                             capture_output=True, text=True, check=True).stdout
    exported = [line.split()[-1] for line in symbols.splitlines() if " T " in line]
    assert "__tvm_ffi_stories_q4_decode" in exported
    assert "__tvm_ffi_stories_q4_mlcc_metadata" in exported
    assert all(s.startswith("__tvm_ffi_stories_q4_") for s in exported), exported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objs", "stories.tar"]


def test_system_lib_entries_find_their_kernels(tmp_path):
    """The prefixed entries call prefixed kernels: load the objects and run a decode step."""
    import numpy as np
    import tvm

    from mlcc.runtime_check.reference import ReferenceModel

    out = tmp_path / "stories.tar"
    compile_model(STORIES, out, quantization="q0f32", system_lib_prefix="sq0_")
    tvm.runtime.load_module(str(out))  # links the objects; they register into the system lib
    lib = tvm.runtime.system_lib("sq0_")
    nbytes = int(lib["sq0_mlcc_metadata_nbytes"]())
    assert nbytes > 100
    reference = ReferenceModel(STORIES, "q0f32")
    engine_meta = np.zeros(nbytes, np.uint8)
    lib["sq0_mlcc_metadata"](engine_meta)
    assert b'"quantization":"q0f32"' in engine_meta.tobytes()
    assert reference.params  # weights for the call below exist


def test_library_refuses_weights_of_another_model(libraries, tmp_path):
    from mlcc.runtime_check.reference import ReferenceModel

    lib = libraries.get(STORIES, "q0f32", "O2")
    params = dict(ReferenceModel(STORIES, "q0f32").params)
    params["model.norm.weight"] = params["model.norm.weight"][:32]  # a smaller model's tensor
    with pytest.raises(MlccError, match=r"model.norm.weight: the library expects float32\[64\]"):
        CompiledEngine(lib, params)
