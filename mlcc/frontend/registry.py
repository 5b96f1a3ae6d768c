"""The registry of supported architectures and `resolve_model`, the one way to name a model.

A model source is an HF folder with config.json, a path to a config.json, or a preset name.
`resolve_model` turns any of them into a `ModelSource`: the architecture, its validated config
and the raw HF dicts that gen_config needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlcc.errors import MlccError
from mlcc.frontend import (
    gemma,
    gpt2,
    gpt_bigcode,
    gpt_neox,
    llama,
    mistral,
    mixtral,
    phi,
    qwen2,
    stablelm,
)
from mlcc.frontend.architecture import Architecture
from mlcc.frontend.config import ModelConfig
from mlcc.frontend.presets import PRESETS, get_preset, preset_names

STAGE = "config"

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (llama.ARCHITECTURE, mistral.ARCHITECTURE, gpt_neox.ARCHITECTURE,
                 qwen2.ARCHITECTURE, stablelm.ARCHITECTURE, phi.ARCHITECTURE,
                 gemma.ARCHITECTURE, gpt2.ARCHITECTURE, gpt_bigcode.ARCHITECTURE,
                 mixtral.ARCHITECTURE)
}

__all__ = ["ARCHITECTURES", "Architecture", "ModelSource", "get_architecture", "resolve_model"]


def get_architecture(model_type: str) -> Architecture:
    """The architecture registered for HF `model_type` (e.g. "llama")."""
    if model_type not in ARCHITECTURES:
        raise MlccError(
            STAGE,
            f"model_type {model_type!r} is not supported; known: "
            f"{', '.join(sorted(ARCHITECTURES))}",
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what it is, its validated config, and where it came from."""

    arch: Architecture
    config: ModelConfig
    hf_dir: Path | None
    hf_config: dict
    generation_config: dict | None
    preset: str | None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise MlccError(STAGE, f"{path}: cannot read {what} ({err})") from None
    except json.JSONDecodeError as err:
        raise MlccError(STAGE, f"{path}: {what} is not valid JSON ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise MlccError(STAGE, f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _locate(source: str | Path) -> tuple[dict, Path | None, str | None]:
    """(hf_config, hf_dir, preset) for a folder, a config.json path or a preset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise MlccError(
                STAGE,
                f"{path}: no config.json in this folder; pass an HF model folder, a config.json "
                "file, or a preset name",
            )
        return _read_json(config_path, "config.json"), path, None
    if path.is_file():
        return _read_json(path, "config.json"), path.parent, None
    if str(source) in PRESETS:
        return get_preset(str(source)), None, str(source)
    raise MlccError(
        STAGE,
        f"{source}: no such folder or file, and not a preset; known presets: "
        f"{', '.join(preset_names())}",
    )


def resolve_model(source: str | Path, model_type: str | None = None) -> ModelSource:
    """Find, read and validate a model's config.

    `model_type` (None or "auto": take config.json's) chooses the architecture explicitly,
    for configs that lack `model_type` or name a compatible one.
    """
    hf_config, hf_dir, preset = _locate(source)
    if model_type in (None, "auto"):
        model_type = hf_config.get("model_type")
        if not isinstance(model_type, str):
            raise MlccError(
                STAGE,
                f"{source}: config.json has no usable 'model_type' (got {model_type!r}); pass "
                f"--model-type, one of {', '.join(sorted(ARCHITECTURES))}",
            )
    arch = get_architecture(model_type)
    # The explicit choice wins over config.json's own model_type.
    config = arch.config_cls.from_hf({**hf_config, "model_type": arch.name})
    generation_config = None
    if hf_dir is not None and (hf_dir / "generation_config.json").is_file():
        generation_config = _read_json(hf_dir / "generation_config.json",
                                       "generation_config.json")
    return ModelSource(arch, config, hf_dir, hf_config, generation_config, preset)
