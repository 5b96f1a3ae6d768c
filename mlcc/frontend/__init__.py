"""The frontend: model configs, the architecture registry, presets and HF weight loading.

`resolve_model` names a model (HF folder, config.json or preset) and `get_architecture` finds
its family; the weight loaders (`open_checkpoint`, `iter_params`, `load_params`) import torch,
so they are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from mlcc.frontend.architecture import Architecture, ParamSource, WeightMapping
from mlcc.frontend.config import ModelConfig, RopeScaling, rope_inv_freq
from mlcc.frontend.presets import get_preset, preset_names
from mlcc.frontend.registry import ARCHITECTURES, ModelSource, get_architecture, resolve_model

_LAZY = {
    "Checkpoint": "mlcc.frontend.hf_weights",
    "open_checkpoint": "mlcc.frontend.hf_weights",
    "iter_params": "mlcc.frontend.hf_weights",
    "load_params": "mlcc.frontend.hf_weights",
}

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Checkpoint",
    "ModelConfig",
    "ModelSource",
    "ParamSource",
    "RopeScaling",
    "WeightMapping",
    "get_architecture",
    "get_preset",
    "iter_params",
    "load_params",
    "open_checkpoint",
    "preset_names",
    "resolve_model",
    "rope_inv_freq",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlcc.frontend' has no attribute {name!r}")
