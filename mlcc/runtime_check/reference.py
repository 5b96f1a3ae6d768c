"""ReferenceModel: a model run by the NumPy IR interpreter, the oracle for compiled libraries.

It builds the IR from the same model description that compile uses, legalizes dtypes and
quantized weights exactly as the compiler does (but applies no fusion or layout pass), and runs
the result op by op. Sources: an HF folder (weights quantized here with mlcc.quant) or a params
folder written by convert_weight + gen_config (weights read as stored).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlcc import ir
from mlcc.errors import MlccError
from mlcc.passes import run_passes
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.quantize import QuantizeWeights
from mlcc.quant import get_scheme
from mlcc.runtime_check.engine import EngineHelpers

STAGE = "reference"


def _is_params_dir(path: Path) -> bool:
    return (path / "mlc-chat-config.json").is_file() and (path / "ndarray-cache.json").is_file()


def _load_params_dir(path: Path, quantization: str | None):
    from mlcc.frontend import get_architecture
    from mlcc.frontend.ndarray_cache import load_ndarray_cache

    chat = json.loads((path / "mlc-chat-config.json").read_text())
    stored_quant = chat["quantization"]
    if quantization not in (None, stored_quant):
        raise MlccError(STAGE, f"{path} holds {stored_quant} weights, not {quantization}; "
                        f"pass quantization={stored_quant!r} or convert again")
    arch = get_architecture(chat["model_type"])
    config = arch.config_cls.from_json(chat["model_config"])
    return arch, config, stored_quant, load_ndarray_cache(path)


def _load_hf(source: str | Path, quantization: str, model_type: str | None):
    from mlcc.frontend import iter_params, open_checkpoint, resolve_model

    model = resolve_model(source, model_type)
    if model.hf_dir is None:
        raise MlccError(STAGE, f"{source!r} names a preset without weights; give an HF folder "
                        "or a params folder written by convert_weight")
    scheme = get_scheme(quantization)
    arrays: dict[str, np.ndarray] = {}
    mapping = model.arch.weight_mapping(model.config)
    for param, tensor in iter_params(mapping, open_checkpoint(model.hf_dir)):
        arrays.update(scheme.convert(param, tensor.float()))
    return model.arch, model.config, quantization, arrays


class ReferenceModel(EngineHelpers):
    """The runtime engine contract (reset/append/decode) on top of the IR interpreter."""

    def __init__(self, source: str | Path, quantization: str | None = None,
                 model_type: str | None = None) -> None:
        path = Path(source)
        if path.is_dir() and _is_params_dir(path):
            arch, config, quant, arrays = _load_params_dir(path, quantization)
        else:
            arch, config, quant, arrays = _load_hf(source, quantization or "q0f32", model_type)
        if arch.build_module is None:
            raise MlccError(STAGE, f"architecture {arch.name!r} has no IR builder yet")
        self.config = config
        self.quantization = quant
        scheme = get_scheme(quant)
        module = arch.build_module(config)
        self.module = run_passes(module, [ConvertModelDType(scheme.model_dtype),
                                          QuantizeWeights(quant)]).module
        self.params = self._check_params(arrays)
        cache_type = next(v.type for v in self.module.function("decode").inputs
                          if isinstance(v.type, ir.KVCacheType))
        self.cache = ir.KVCacheState(cache_type)

    def _check_params(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for p in self.module.params:
            if p.name not in arrays:
                raise MlccError(STAGE, f"parameter {p.name} ({p.type}) is missing from the "
                                "weights; convert them again with this quantization")
            array = arrays[p.name]
            if tuple(array.shape) != tuple(p.type.shape) or array.dtype != np.dtype(p.type.dtype):
                raise MlccError(STAGE, f"parameter {p.name}: expected {p.type}, got "
                                f"{array.dtype}{list(array.shape)}")
            out[p.name] = array
        return out

    # --- engine contract ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_window_size(self) -> int:
        return self.config.context_window_size

    @property
    def sliding_window_size(self) -> int:
        return self.config.sliding_window_size

    @property
    def prefill_chunk_size(self) -> int:
        return self.config.prefill_chunk_size

    @property
    def total_tokens(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()

    def _check_room(self, n: int) -> None:
        window = self.context_window_size
        if window > 0 and self.cache.length + n > window:
            raise MlccError(STAGE, f"{self.cache.length} cached + {n} new tokens exceed the "
                            f"context window of {window}; reset the sequence")

    def append(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise MlccError(STAGE, "append needs at least one token")
        self._check_room(ids.size)
        chunk = max(1, self.prefill_chunk_size)
        for start in range(0, ids.size, chunk):
            (logits,) = ir.interpret(self.module, "prefill", [ids[start:start + chunk],
                                                              self.cache], self.params)
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        self._check_room(1)
        (logits,) = ir.interpret(self.module, "decode",
                                 [np.array([token_id], np.int32), self.cache], self.params)
        return logits
