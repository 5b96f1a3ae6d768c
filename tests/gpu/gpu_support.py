"""What the GPU test modules share: how many GPUs the TVM runtime can use here, and the folder
of prebuilt cases (libraries compiled on the build machine and carried to the GPU machine)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

# Logits tolerance against ReferenceModel per quantization (issue 7: 1e-3 in float32, 2e-2 in
# float16 activations).
TOLERANCE = {"q0f32": 1e-3, "q0f16": 2e-2, "q4f16_1": 2e-2}


def usable_gpus() -> int:
    """CUDA GPUs usable through the TVM runtime: 0 when there is none (or no CUDA runtime)."""
    try:
        from mlcc.runtime_check.compiled import _device

        _device("cuda")
    except Exception:  # noqa: BLE001 - any failure means: no usable GPU here
        return 0
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - torch is only needed to count them
        return 1


def require_gpus(count: int = 1) -> int:
    """Skip the calling test module unless `count` GPUs are usable; how many there are."""
    gpus = usable_gpus()
    if gpus < count:
        what = "a CUDA GPU" if count == 1 else f"at least {count} CUDA GPUs"
        pytest.skip(f"needs {what} visible to the TVM runtime", allow_module_level=True)
    return gpus


def load_cases(tmp_path_factory, env_var: str, builder: str) -> tuple[Path, dict]:
    """(folder, manifest) of the cases in $`env_var`, or built here by `builder`
    ("module:function", which needs the TVM compiler) into a temporary folder."""
    folder = os.environ.get(env_var)
    if folder:
        root = Path(folder)
        return root, json.loads((root / "manifest.json").read_text())
    module, function = builder.split(":")
    build = getattr(importlib.import_module(module), function)
    root = tmp_path_factory.mktemp(module)
    return root, build(root)


def open_case(cases: tuple[Path, dict], name: str, **kwargs):
    """(CompiledEngine on the GPU, ReferenceModel, manifest entry) of case `name`: the case's
    library over the weights its reference model reads."""
    from mlcc.runtime_check.compiled import CompiledEngine
    from mlcc.runtime_check.reference import ReferenceModel

    root, manifest = cases
    case = manifest[name]
    reference = ReferenceModel(root / case["model"], case["quantization"])
    engine = CompiledEngine(root / case["lib"], reference.params, device="cuda", **kwargs)
    return engine, reference, case
