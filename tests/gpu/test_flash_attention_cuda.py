"""Prefill attention on the GPU: the tensor-core kernel (and its ldmatrix variant) and the
CUDA-core kernel against float32 attention over the visible keys of a random paged cache.

The library and cases come from MLCC_ATTENTION_CASES (a folder made on the build machine by
`python benchmarks/cuda/attention_bench.py build FOLDER`) or, where the TVM compiler is
installed, are built here. Cases: the Llama-2-7B layer (512 tokens at 0, 256 at 512), GQA 32/8,
a sliding window of 256 with 4 sinks after the ring wrapped, and chunks starting inside a tile
and ending in a partial one; the appended keys and values are checked too.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from gpu_support import require_gpus

pytestmark = pytest.mark.gpu

require_gpus(1)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda" / "attention_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("attention_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    bench = load_bench()
    folder = os.environ.get("MLCC_ATTENTION_CASES")
    if folder:
        folder = Path(folder)
    else:
        folder = tmp_path_factory.mktemp("attention")
        bench.build(folder)
    torch.backends.cuda.matmul.allow_tf32 = False
    lib = tvm.runtime.load_module(str(folder / "attention_bench.so"))
    doc = json.loads((folder / "cases.json").read_text())
    return bench, torch, tvm, lib, _device("cuda"), doc


@pytest.mark.parametrize("case", [c[0] for c in load_bench().CASES])
def test_prefill_attention_equals_float32_reference(library, case):
    bench, torch, tvm, lib, dev, doc = library
    (chosen,) = [c for c in doc["cases"] if c[0] == case]
    for row in bench.validate(torch, tvm, lib, dev, doc, chosen):
        assert row["k_err"] < 1e-2 and row["v_err"] == 0, (row["variant"], row)
        assert row["y_err"] < bench.TOLERANCE, (row["variant"], row["y_err"])
