"""build_library: artifacts, embedded metadata, errors; loading with the TVM runtime alone.

The runtime checks run in a subprocess with TVM_USE_RUNTIME_LIB=1, so libtvm_compiler is never
loaded there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlcc.backends.build import build_library, make_target
from mlcc.backends.entry import EntryBuilder
from mlcc.backends.llvm import kernels as K
from mlcc.backends.llvm import linear as L
from mlcc.errors import MlccError

VOCAB, HIDDEN = 50, 32
PARAMS = [{"name": "embed", "shape": [VOCAB, HIDDEN], "dtype": "float32"},
          {"name": "head", "shape": [VOCAB, HIDDEN], "dtype": "float32"}]
METADATA = {"model_type": "toy", "quantization": "q0f32", "params": PARAMS,
            "note": 'quotes " and \\ backslash, a newline \n and unicode \u00e9'}


def toy_entries():
    """prefill/decode: logits = head @ embed[last token] (an embedding plus an lm_head)."""
    kernels, entries = {}, []
    for name, rows in (("prefill", "seq_len"), ("decode", 1)):
        eb = EntryBuilder(name, {"seq_len": 16})
        tokens = eb.arg("tokens", (rows,), "int32", role="tokens")
        embed = eb.param("embed", (VOCAB, HIDDEN), "float32")
        head = eb.param("head", (VOCAB, HIDDEN), "float32")
        logits = eb.arg("logits", (VOCAB,), "float32", role="logits")
        h = eb.temp("h", (rows, HIDDEN), "float32")
        eb.call(K.embedding(f"{name}_embed", rows, VOCAB, HIDDEN, "float32"),
                [tokens, embed, h])
        eb.call(L.linear(f"{name}_head", rows, HIDDEN, VOCAB, "float32", last_row=True),
                [h, head, logits])
        entries.append(eb.finish())
        kernels.update(eb.kernels)
    return kernels, entries


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    root = tmp_path_factory.mktemp("llvm_build")
    kernels, entries = toy_entries()
    out = {}
    for suffix in (".so", ".tar"):
        path = root / f"toy{suffix}"
        out[suffix] = (path, build_library(kernels, entries, METADATA, "cpu", path))
    return out


def test_artifacts_are_written_whole(libraries):
    so, meta = libraries[".so"]
    assert so.stat().st_size > 0 and not list(so.parent.glob(".*partial*"))
    assert meta["entries"]["decode"]["args"][0] == {"name": "tokens", "role": "tokens",
                                                    "shape": [1], "dtype": "int32"}
    assert meta["kernels"] == ["decode_embed", "decode_head", "prefill_embed", "prefill_head"]
    assert meta["compiler"]["mlcc"] and meta["target"].startswith('{"kind":"llvm"')
    assert meta["symbol_bounds"] == {"seq_len": 16} and meta["kv_cache"] == {}
    assert meta["memory"] == {"params_bytes": 2 * VOCAB * HIDDEN * 4,
                              "workspace_bytes": 16 * HIDDEN * 4, "kv_cache_bytes": 0}
    tar, _ = libraries[".tar"]
    with tarfile.open(tar) as archive:
        assert any(n.endswith(".o") for n in archive.getnames())


RUNTIME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mlcc.runtime_check.tvm_runtime import load_library, runtime_only
    lib = load_library(sys.argv[1])
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((50, 32)).astype(np.float32)
    head = rng.standard_normal((50, 32)).astype(np.float32)
    session = lib.session({"embed": embed, "head": head})
    first = session.run("prefill", [3, 7, 11])
    second = session.run("decode", [5])
    ok = (np.allclose(first, head @ embed[11], atol=1e-4)
          and np.allclose(second, head @ embed[5], atol=1e-4))
    print(json.dumps({"runtime_only": runtime_only(), "note": lib.metadata["note"],
                      "entries": lib.entry_names, "ok": bool(ok), "length": session.length,
                      "compiler_loaded": "tvm.s_tir" in sys.modules}))
""")


@pytest.mark.parametrize("suffix", [".so", ".tar"])
def test_runtime_only_process_reads_metadata_and_runs_entries(libraries, suffix):
    path, _ = libraries[suffix]
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    done = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT, str(path)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"runtime_only": True, "note": METADATA["note"],
                      "entries": ["prefill", "decode"], "ok": True, "length": 4,
                      "compiler_loaded": False}


def test_session_rejects_weights_that_do_not_match(libraries):
    from mlcc.runtime_check.tvm_runtime import load_library

    lib = load_library(libraries[".so"][0])
    good = np.zeros((VOCAB, HIDDEN), np.float32)
    with pytest.raises(MlccError, match=r"parameter head \(float32\[50, 32\]\) is missing"):
        lib.session({"embed": good})
    with pytest.raises(MlccError, match=r"expects float32\[50, 32\], the weights have "
                                        r"float16\[50, 32\]"):
        lib.session({"embed": good, "head": good.astype(np.float16)})
    with pytest.raises(MlccError, match="has no entry 'verify'"):
        lib.call("verify")
    with pytest.raises(MlccError, match="entry decode takes 5 arguments"):
        lib.call("decode", np.zeros(1, np.int32))
    lib.metadata["entries"]["decode"] = {"inputs": []}  # as written without EntryBuilder
    session = lib.session({"embed": good, "head": good})
    with pytest.raises(MlccError, match="carries no argument roles"):
        session.run("decode", [1])


def test_metadata_and_artifact_errors(tmp_path):
    kernels, entries = toy_entries()
    with pytest.raises(MlccError, match="lacks quantization, params"):
        build_library(kernels, entries, {"model_type": "toy"}, "cpu", tmp_path / "a.so")
    with pytest.raises(MlccError, match=r"suffix \.wasm is not built by the LLVM backend"):
        build_library(kernels, entries, METADATA, "cpu", tmp_path / "a.wasm")
    with pytest.raises(MlccError, match="--device 'cuda' has no backend here"):
        make_target("cuda")
    clash = K.embedding("prefill", 1, VOCAB, HIDDEN, "float32")
    with pytest.raises(MlccError, match="two different functions are named prefill"):
        build_library([clash], entries, METADATA, "cpu", tmp_path / "b.so")
    with pytest.raises(MlccError, match="not JSON-serializable"):
        build_library(kernels, entries, {**METADATA, "bad": object()}, "cpu", tmp_path / "c.so")
    assert not list(tmp_path.iterdir())


def test_cross_triple_and_system_lib_prefix(tmp_path):
    kernels, entries = toy_entries()
    target = make_target("cpu", host="aarch64-linux-gnu")
    assert target.attrs["mtriple"] == "aarch64-linux-gnu" and "mcpu" not in target.attrs
    path = tmp_path / "toy_arm.tar"
    build_library(kernels, entries, METADATA, "cpu", path, system_lib_prefix="toy_",
                  host="aarch64-linux-gnu")
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".o"))
        blob = tar.extractfile(member).read()
    assert blob[:4] == b"\x7fELF" and blob[18] == 183  # e_machine EM_AARCH64
    assert b"toy_prefill" in blob and b"toy_decode_head" in blob
    assert b"toy_mlcc_metadata" in blob


def test_temporary_file_is_removed_when_linking_fails(tmp_path):
    kernels, entries = toy_entries()
    path = tmp_path / "toy_arm.so"  # a foreign object cannot be linked by the host compiler
    with pytest.raises(MlccError, match="writing .*toy_arm.so failed"):
        build_library(kernels, entries, METADATA, "cpu", path, host="aarch64-linux-gnu")
    assert not list(Path(tmp_path).iterdir())
