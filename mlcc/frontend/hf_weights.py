"""Lazy loading of HF checkpoints: safetensors or PyTorch .bin, single file or sharded.

`open_checkpoint` finds the weight files and which tensor lives where (from the shard index or
the file headers) without reading tensor data. `iter_params` then walks the files in order,
reads only the tensors the mapping needs, yields each mlcc parameter as soon as all its HF
tensors are read, and closes a file before opening the next, so about one source file is
resident at a time. PyTorch files are read with `torch.load(weights_only=True, mmap=True)`: a
pickle that would run code is refused.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from mlcc.errors import MlccError
from mlcc.frontend.architecture import ParamSource, WeightMapping

SOURCE_FORMATS = {
    "auto": None,
    "huggingface-safetensor": "safetensors",
    "safetensors": "safetensors",
    "huggingface-torch": "pytorch",
    "pytorch": "pytorch",
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# Non-weight .bin files that HF folders may hold next to the weights.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}
_KEPT_DTYPES = (torch.float16, torch.bfloat16)
_MAX_LISTED = 5
_SAFETENSORS_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


@dataclass(frozen=True)
class Checkpoint:
    """The weight files of one model and, when an index names them, where each tensor is."""

    root: Path
    format: str  # "safetensors" | "pytorch"
    files: tuple[Path, ...]
    index: dict[str, Path] | None = None
    stage: str = "convert_weight"
    _located: dict[str, Path] = field(default_factory=dict, compare=False, repr=False)

    def fail(self, message: str) -> MlccError:
        return MlccError(self.stage, message)

    def locate(self) -> dict[str, Path]:
        """HF tensor name -> file holding it (reads file headers when there is no index)."""
        if not self._located:
            if self.index is not None:
                self._located.update(self.index)
            else:
                for path in self.files:
                    with self.open_file(path) as shard:
                        for name in shard.keys():
                            self._located.setdefault(name, path)
        return self._located

    def open_file(self, path: Path) -> ShardReader:
        """A reader over one weight file; use it as a context manager so it is released."""
        if self.format == "safetensors":
            return SafetensorsShard(path, self.stage)
        return TorchShard(path, self.stage)


class ShardReader:
    """One open weight file: tensor names, shapes and data, read on demand."""

    path: Path
    stage: str

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _corrupt(self, kind: str, err: BaseException) -> MlccError:
        return MlccError(
            self.stage,
            f"{self.path.name}: cannot read this {kind} file ({_short(err)}); it is truncated or "
            "corrupt: download it again",
        )


class SafetensorsShard(ShardReader):
    """A safetensors file opened with `safe_open`: only the header is read up front."""

    def __init__(self, path: Path, stage: str) -> None:
        from safetensors import safe_open

        self.path, self.stage = path, stage
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except _SAFETENSORS_ERRORS as err:
            raise self._corrupt("safetensors", err) from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except _SAFETENSORS_ERRORS as err:
            raise self._corrupt("safetensors", err) from None

    def close(self) -> None:
        self._file = None


class TorchShard(ShardReader):
    """A PyTorch .bin file, memory-mapped; tensors are copied out when read."""

    def __init__(self, path: Path, stage: str) -> None:
        self.path, self.stage = path, stage
        self._state = _torch_load(path, stage)

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        # A copy, so nothing we hand out keeps the file's mapping alive.
        return self._state[name].clone()

    def close(self) -> None:
        self._state = {}


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _torch_load(path: Path, stage: str) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err).lower():
                raise
            # Files from the legacy (pre-zip) serializer cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        raise MlccError(
            stage,
            f"{path.name}: refused to load: its pickle needs more than plain tensors "
            f"({_short(err)}); only plain state dicts are read because a pickle can run code: "
            "convert the checkpoint to safetensors",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MlccError(
            stage,
            f"{path.name}: cannot read this PyTorch file ({_short(err)}); it is truncated or "
            "corrupt: download it again",
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise MlccError(
            stage,
            f"{path.name}: expected a state dict of name -> tensor, got {type(state).__name__}; "
            "save the model with save_pretrained",
        )
    return state


# ----- finding the files -------------------------------------------------------------------


def _read_index(index_path: Path, stage: str) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MlccError(
            stage, f"{index_path.name}: not a valid shard index ({_short(err)}); fix or re-download"
        ) from None
    located = {name: index_path.parent / file for name, file in weight_map.items()}
    for path in sorted(set(located.values())):
        if not path.is_file():
            raise MlccError(
                stage,
                f"{path.name}: listed in {index_path.name} but missing from {index_path.parent}; "
                "download the missing shard",
            )
    return located


def _checkpoint_of_file(path: Path, fmt: str | None, stage: str) -> Checkpoint:
    if path.name.endswith(".index.json"):
        index = _read_index(path, stage)
        kind = fmt or ("safetensors" if ".safetensors" in path.name else "pytorch")
        return Checkpoint(path.parent, kind, tuple(sorted(set(index.values()))), index, stage)
    kind = fmt or ("safetensors" if path.suffix == ".safetensors" else "pytorch")
    return Checkpoint(path.parent, kind, (path,), None, stage)


def _checkpoint_of_dir(root: Path, fmt: str | None, stage: str) -> Checkpoint | None:
    kinds = [fmt] if fmt else ["safetensors", "pytorch"]
    for kind in kinds:
        index_name, single, pattern = (
            (SAFETENSORS_INDEX, "model.safetensors", "*.safetensors")
            if kind == "safetensors"
            else (PYTORCH_INDEX, "pytorch_model.bin", "*.bin")
        )
        if (root / index_name).is_file():
            return _checkpoint_of_file(root / index_name, kind, stage)
        if (root / single).is_file():
            return Checkpoint(root, kind, (root / single,), None, stage)
        files = [p for p in sorted(root.glob(pattern)) if p.name not in _NOT_WEIGHTS]
        if files:
            return Checkpoint(root, kind, tuple(files), None, stage)
    return None


def open_checkpoint(
    hf_dir: str | Path | None,
    source: str | Path | None = None,
    source_format: str = "auto",
    *,
    stage: str = "convert_weight",
) -> Checkpoint:
    """Find the weights of a model: `source` (a folder, a weight file or a shard index) if
    given, else `hf_dir`. `source_format`: "auto", "huggingface-safetensor" or
    "huggingface-torch" (also "safetensors" / "pytorch")."""
    if source_format not in SOURCE_FORMATS:
        raise MlccError(
            stage,
            f"--source-format {source_format!r} is not known; use one of "
            f"{', '.join(SOURCE_FORMATS)}",
        )
    fmt = SOURCE_FORMATS[source_format]
    if source is None and hf_dir is None:
        raise MlccError(stage, "no weights to load: a preset has no folder; pass --source DIR")
    root = Path(source if source is not None else hf_dir).expanduser()
    if root.is_file():
        return _checkpoint_of_file(root, fmt, stage)
    if not root.is_dir():
        raise MlccError(stage, f"{root}: no such weight file or folder; check --source")
    checkpoint = _checkpoint_of_dir(root, fmt, stage)
    if checkpoint is None:
        wanted = {"safetensors": "*.safetensors", "pytorch": "pytorch_model.bin / *.bin"}
        kinds = [wanted[fmt]] if fmt else list(wanted.values())
        raise MlccError(
            stage, f"{root}: no weight files found (looked for {' or '.join(kinds)}); "
            "pass the folder holding the weights with --source",
        )
    return checkpoint


# ----- reading parameters -----------------------------------------------------------------


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _check_names(mapping: WeightMapping, checkpoint: Checkpoint) -> None:
    """Every needed HF tensor exists, and every stored tensor is needed or ignored on purpose."""
    located = checkpoint.locate()
    needed = mapping.hf_names()
    missing = [hf for hf in needed if hf not in located]
    if missing:
        first = missing[0]
        param = needed[first]
        shape = param.hf_shapes[param.hf_names.index(first)]
        files = _listed([p.name for p in checkpoint.files])
        raise checkpoint.fail(
            f"{first}: missing from the checkpoint (expected shape {shape}, for {param.name}; "
            f"searched {files}); missing {len(missing)} tensors in all: {_listed(missing)}. "
            "Check that config.json matches these weights"
        )
    unexpected = [n for n in located if n not in needed and not mapping.is_unused(n)]
    if unexpected:
        first = unexpected[0]
        raise checkpoint.fail(
            f"{first}: unexpected tensor in {located[first].name}, the model defined by "
            f"config.json has no such parameter ({len(unexpected)} unexpected in all: "
            f"{_listed(unexpected)}); check model_type and config.json against the weights"
        )


def _check_shape(checkpoint: Checkpoint, name: str, expected: tuple[int, ...],
                 found: tuple[int, ...], path: Path) -> None:
    if tuple(found) != tuple(expected):
        raise checkpoint.fail(f"{name}: expected {tuple(expected)}, got {tuple(found)} in "
                              f"{path.name}")


def _check_header_shapes(mapping: WeightMapping, checkpoint: Checkpoint) -> None:
    """safetensors headers give every shape without reading data: fail before any work."""
    if checkpoint.format != "safetensors":
        return
    located = checkpoint.locate()
    by_file: dict[Path, list[tuple[str, tuple[int, ...]]]] = {}
    for param in mapping.params:
        for hf, shape in zip(param.hf_names, param.hf_shapes):
            by_file.setdefault(located[hf], []).append((hf, shape))
    for path, tensors in by_file.items():
        with checkpoint.open_file(path) as shard:
            stored = set(shard.keys())
            for hf, shape in tensors:
                if hf not in stored:
                    raise checkpoint.fail(
                        f"{hf}: the shard index places it in {path.name} but that file lacks "
                        "it; re-download the checkpoint"
                    )
                _check_shape(checkpoint, hf, shape, shard.shape(hf), path)


def combine_parts(param: ParamSource, parts: list[torch.Tensor]) -> torch.Tensor:
    """Build parameter `param` from its HF tensors (in `param.hf_names` order)."""
    if param.combine == "identity":
        combined = parts[0]
    elif param.combine == "concat0":
        combined = torch.cat([p.to(parts[0].dtype) for p in parts], dim=0)
    elif param.combine == "transpose":  # (in_features, out_features) -> (out, in)
        combined = parts[0].t()
    else:  # neox_qkv: rows per head [q_h, k_h, v_h] -> all q, all k, all v.
        fused = parts[0]
        rest = tuple(fused.shape[1:])
        per_head = fused.shape[0] // (3 * param.heads)
        combined = fused.reshape(param.heads, 3, per_head, *rest).transpose(0, 1)
        combined = combined.reshape(fused.shape)
    dtype = combined.dtype if combined.dtype in _KEPT_DTYPES else torch.float32
    return combined.to(dtype).contiguous()


def _plan(mapping: WeightMapping, checkpoint: Checkpoint) -> dict[Path, list[ParamSource]]:
    """For each file in read order, the parameters (in load order) with a part stored in it."""
    located = checkpoint.locate()
    plan: dict[Path, list[ParamSource]] = {path: [] for path in checkpoint.files}
    for param in mapping.params:
        for path in dict.fromkeys(located[hf] for hf in param.hf_names):
            plan.setdefault(path, []).append(param)
    return plan


def _read_part(checkpoint: Checkpoint, shard: ShardReader, hf: str,
               shape: tuple[int, ...]) -> torch.Tensor:
    try:
        tensor = shard.get(hf)
    except KeyError:
        raise checkpoint.fail(
            f"{hf}: the shard index places it in {shard.path.name} but that file lacks it; "
            "re-download the checkpoint"
        ) from None
    _check_shape(checkpoint, hf, shape, tuple(tensor.shape), shard.path)
    if not tensor.is_floating_point():
        raise checkpoint.fail(
            f"{hf}: dtype {str(tensor.dtype).removeprefix('torch.')} in {shard.path.name} is not "
            "a floating type; pre-quantized checkpoints need their own quantization mode"
        )
    return tensor


def iter_params(
    mapping: WeightMapping, checkpoint: Checkpoint
) -> Iterator[tuple[ParamSource, torch.Tensor]]:
    """Yield (parameter, tensor) for every parameter of `mapping`, reading lazily.

    Files are visited in order and each is closed before the next opens; a parameter is yielded
    as soon as its last HF tensor is read (parts from earlier files wait as copies). Tensors
    are float32, or float16 / bfloat16 when stored so. HF names are found with or without the
    mapping's `hf_prefix`; the yielded parameter lists them as the checkpoint spells them.
    """
    located = checkpoint.locate()
    mapping = mapping.spelled_as(located)
    _check_names(mapping, checkpoint)
    _check_header_shapes(mapping, checkpoint)
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for path, params in _plan(mapping, checkpoint).items():
        if not params:
            continue
        with checkpoint.open_file(path) as shard:
            for param in params:
                parts = waiting.setdefault(param.name, {})
                for hf, shape in zip(param.hf_names, param.hf_shapes):
                    if located[hf] == path:
                        parts[hf] = _read_part(checkpoint, shard, hf, shape)
                if len(parts) == len(param.hf_names):
                    del waiting[param.name]
                    yield param, combine_parts(param, [parts[hf] for hf in param.hf_names])


def load_params(mapping: WeightMapping, checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """All parameters as float32 NumPy arrays (for small models and tests)."""
    return {
        param.name: tensor.to(torch.float32).numpy()
        for param, tensor in iter_params(mapping, checkpoint)
    }
