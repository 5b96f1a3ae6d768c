"""Which model a benchmark runs on, and where its HF folder comes from.

A model is named by one of:
- `stories260K`: the real trained 260K Llama in ../shared/models/stories260K;
- `random-llama-100m`: a random Llama (hidden 768, intermediate 2048, 12 layers, 12 heads,
  vocab 32000, untied; ~134M parameters), the shape of design.md's CPU anchor, created once
  with transformers in the cache folder;
- a preset name (`llama2_7b`, ...): random weights of the preset's shape, created the same way;
- an HF folder with config.json and weights.

Random weights are stored as float16 safetensors, so the peer (transformers) and mlcc read the
same values whatever precision each computes in.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlcc.errors import MlccError

STAGE = "benchmarks"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BUNDLED = {"stories260K": SHARED / "models" / "stories260K"}
# The tokenizer the random Llama shapes borrow (vocab 32000); ids only matter for chat.
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2"
RANDOM_LLAMA_100M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
    "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_key_value_heads": 12, "vocab_size": 32000, "tie_word_embeddings": False,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float16",
}
RANDOM_MODELS = {"random-llama-100m": RANDOM_LLAMA_100M}
# transformers' default std (0.02) gives nearly flat logits whose argmax flips on rounding
# noise; twice that gives clearer greedy choices while activations stay far from float16's range.
RANDOM_INIT_STD = 0.04
RANDOM_SEED = 0


@dataclass(frozen=True)
class BenchModel:
    """A model ready to convert: its display name and HF folder."""

    name: str
    hf_dir: Path
    random_weights: bool


def cache_root() -> Path:
    """Where random checkpoints and build outputs live: $MLCC_BENCH_CACHE or ~/.cache."""
    env = os.environ.get("MLCC_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlcc-benchmarks"


def resolve_bench_model(name: str, cache: Path | None = None) -> BenchModel:
    """The HF folder for `name` (see the module docstring), creating random weights if needed."""
    cache = cache or cache_root()
    if name in BUNDLED:
        folder = BUNDLED[name]
        if not (folder / "config.json").is_file():
            raise MlccError(STAGE, f"model {name}: {folder} is missing; the bundled model lives "
                            "in ../shared/models next to the repository")
        return BenchModel(name, folder, False)
    if name in RANDOM_MODELS:
        folder = cache / "models" / name
        ensure_random_checkpoint(folder, RANDOM_MODELS[name])
        return BenchModel(name, folder, True)
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MlccError(STAGE, f"model {name}: the folder has no config.json; give an HF "
                            "model folder, a preset, stories260K or random-llama-100m")
        return BenchModel(path.name, path, False)
    from mlcc.frontend.presets import get_preset, preset_names

    if name in preset_names():
        folder = cache / "models" / f"random-{name}"
        ensure_random_checkpoint(folder, get_preset(name))
        return BenchModel(f"random-{name}", folder, True)
    known = ", ".join([*BUNDLED, *RANDOM_MODELS, *preset_names()])
    raise MlccError(STAGE, f"model {name!r} is neither a folder nor a known name; use an HF "
                    f"folder or one of {known}")


def random_model_config(name: str) -> tuple[str, dict] | None:
    """(display name, HF config) of a random-weight model name, or None for other names."""
    if name in RANDOM_MODELS:
        return name, RANDOM_MODELS[name]
    from mlcc.frontend.presets import get_preset, preset_names

    if name in preset_names():
        return f"random-{name}", get_preset(name)
    return None


def resolve_config_only(name: str, cache: Path | None = None) -> BenchModel:
    """Like resolve_bench_model, but a random model gets its config.json and tokenizer only:
    all that gen_config and compile read, so libraries can be built where the weights would
    not fit or take long to create (`python -m benchmarks build`)."""
    random = random_model_config(name)
    if random is None:
        return resolve_bench_model(name, cache)
    display, hf_config = random
    folder = (cache or cache_root()) / "configs" / display
    if not (folder / "config.json").is_file() or \
            json.loads((folder / "config.json").read_text()) != hf_config:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_config_files(folder, hf_config)
    return BenchModel(display, folder, True)


def write_config_files(folder: Path, hf_config: dict) -> None:
    """config.json and, for the Llama-2 vocabulary, its tokenizer files."""
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    if hf_config.get("vocab_size") == 32000 and LLAMA2_TOKENIZER.is_dir():
        for item in LLAMA2_TOKENIZER.iterdir():
            shutil.copyfile(item, folder / item.name)


def ensure_random_checkpoint(folder: Path, hf_config: dict, seed: int = RANDOM_SEED) -> None:
    """Create `folder` with config.json and random float16 weights unless it is complete.

    The weights are drawn on the GPU when one is visible to torch (a 7B model takes minutes on
    a CPU). Written into a sibling folder first and renamed, so an interrupted run leaves
    nothing that looks complete.
    """
    marker = folder / "model.safetensors.index.json"
    if not marker.is_file():
        marker = folder / "model.safetensors"
    if marker.is_file() and json.loads((folder / "config.json").read_text()) == hf_config:
        return
    import torch
    import transformers

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items()
                                                  if k != "architectures"})
    config.initializer_range = RANDOM_INIT_STD
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(staging, safe_serialization=True)
    del model
    write_config_files(staging, hf_config)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
