"""Quantization schemes as data: one frozen dataclass per kind, and the registry of named schemes.

A scheme says which parameters it quantizes (`applies_to`), what each parameter becomes on disk
(`stored_tensors`: names, shapes, dtypes, the contract between convert_weight and compile), how
to produce those arrays from a float weight (`convert`, `quantize`) and how to read them back
(`dequantize`, the NumPy reference of record). Parameters a scheme does not quantize are stored
in its `model_dtype`.

Schemes (names follow MLC LLM: q<bits>f<float bits>_<variant>):
    q0f16, q0f32   no quantization, every parameter in float16 / float32
    q3f16_1        3-bit symmetric groups of 40, float16 scales (10 codes per uint32 word)
    q4f16_1        4-bit symmetric groups of 32, float16 scales
    q4f32_1        4-bit symmetric groups of 32, float32 scales and float32 activations
    q8f16_1        8-bit symmetric groups of 32, float16 scales. Not one of MLC LLM's schemes:
                   an mlcc addition for models that lose too much at 4 bits; 8.5 bits/weight.
    q4f16_awq      pre-quantized AutoAWQ (GEMM) checkpoints loaded as they are: asymmetric 4-bit
                   groups of 128 with zero points (see mlcc.quant.awq for the stored layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mlcc.errors import MlccError
from mlcc.quant import awq, group


class ParamLike(Protocol):
    """The fields of `mlcc.frontend.ParamSource` that a scheme reads."""

    name: str
    shape: tuple[int, ...]
    kind: str


@dataclass(frozen=True)
class StoredTensor:
    """One array that convert_weight writes and compile expects: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """A named quantization scheme; subclasses fix `kind` and implement the numbers."""

    name: str
    kind: str  # "none" | "group" | "awq"
    bits: int  # bits per stored code; 0 when nothing is quantized
    group_size: int  # elements along K sharing one scale; 0 when nothing is quantized
    model_dtype: str  # "float16" | "float32": activations, scales and unquantized parameters
    storage_dtype: str = "uint32"  # the word that packed codes live in

    def applies_to(self, param: ParamLike) -> bool:
        """Whether `param` is stored quantized under this scheme."""
        return False

    def stored_names(self, name: str) -> dict[str, str]:
        """Names of the stored parts of a quantized parameter: `X.weight` -> `X.q_weight`, ..."""
        stem = name.removesuffix(".weight")
        return {part: f"{stem}.{part}" for part in self._parts()}

    def stored_tensors(self, param: ParamLike) -> tuple[StoredTensor, ...]:
        """What convert_weight writes for `param`, in order."""
        if not self.applies_to(param):
            return (StoredTensor(param.name, tuple(param.shape), self.model_dtype),)
        shapes = self._quantized_shapes(*param.shape)
        names = self.stored_names(param.name)
        return tuple(StoredTensor(names[part], shapes[part][0], shapes[part][1])
                     for part in self._parts())

    def convert(self, param: ParamLike, w: torch.Tensor) -> dict[str, np.ndarray]:
        """Stored name -> array for one parameter: quantized where the scheme applies, else cast."""
        if self.applies_to(param):
            names = self.stored_names(param.name)
            return {names[part]: arr for part, arr in self.quantize(w, name=param.name).items()}
        return {param.name: cast_to_model_dtype(w, self.model_dtype, param.name)}

    def quantize(self, w: torch.Tensor, name: str = "weight") -> dict[str, np.ndarray]:
        """Quantize a (N, K) float weight on its device into the scheme's stored parts."""
        raise MlccError("quantize", f"{name}: scheme {self.name} does not quantize weights")

    def dequantize(
        self, q_weight: np.ndarray, q_scale: np.ndarray, k: int, q_zeros: np.ndarray | None = None
    ) -> np.ndarray:
        """NumPy reference: the float32 (N, k) weight that the stored parts represent."""
        raise MlccError("quantize", f"scheme {self.name} stores no quantized weights")

    def _parts(self) -> tuple[str, ...]:
        return ("q_weight", "q_scale")

    def _quantized_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class NoQuant(QuantScheme):
    """Every parameter stored in `model_dtype` (q0f16, q0f32)."""

    kind: str = "none"
    bits: int = 0
    group_size: int = 0


@dataclass(frozen=True, kw_only=True)
class GroupQuant(QuantScheme):
    """Symmetric per-group quantization along K of linear weights and the embedding."""

    kind: str = "group"

    def applies_to(self, param: ParamLike) -> bool:
        return param.kind in ("linear", "embedding") and len(param.shape) == 2

    def quantize(self, w: torch.Tensor, name: str = "weight") -> dict[str, np.ndarray]:
        return group.quantize_group(w, self.bits, self.group_size, self.model_dtype, name)

    def dequantize(
        self, q_weight: np.ndarray, q_scale: np.ndarray, k: int, q_zeros: np.ndarray | None = None
    ) -> np.ndarray:
        return group.dequantize_group(q_weight, q_scale, k, self.bits, self.group_size)

    def _quantized_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
        k_pad = group.padded_k(k, self.bits, self.group_size)
        return {
            "q_weight": ((n, k_pad // group.codes_per_word(self.bits)), self.storage_dtype),
            "q_scale": ((n, k_pad // self.group_size), self.model_dtype),
        }


@dataclass(frozen=True, kw_only=True)
class AWQQuant(QuantScheme):
    """Asymmetric 4-bit groups read from AutoAWQ GEMM checkpoints; nothing is quantized here.

    AutoAWQ leaves the embedding and lm_head in float16, so only the decoder's linear layers
    are stored as `q_weight`/`q_scale`/`q_zeros`.
    """

    kind: str = "awq"

    def applies_to(self, param: ParamLike) -> bool:
        return param.kind == "linear" and not param.name.startswith("lm_head")

    def convert(self, param: ParamLike, w: torch.Tensor) -> dict[str, np.ndarray]:
        if self.applies_to(param):
            raise MlccError("convert_weight", f"{param.name}: {self.name} reads pre-quantized "
                            "AutoAWQ tensors (qweight, qzeros, scales), got a float weight; use "
                            "an AutoAWQ checkpoint or a scheme such as q4f16_1")
        return super().convert(param, w)

    def from_awq(
        self, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, name: str
    ) -> dict[str, np.ndarray]:
        """Parts of one AutoAWQ layer in mlcc's layout, keyed by part (q_weight, ...)."""
        return awq.awq_to_mlcc(qweight, qzeros, scales, self.group_size, name)

    def dequantize(
        self, q_weight: np.ndarray, q_scale: np.ndarray, k: int, q_zeros: np.ndarray | None = None
    ) -> np.ndarray:
        if q_zeros is None:
            raise MlccError("quantize", f"{self.name}: dequantize needs q_zeros")
        return awq.dequantize_awq(q_weight, q_scale, q_zeros, k, self.group_size)

    def _parts(self) -> tuple[str, ...]:
        return ("q_weight", "q_scale", "q_zeros")

    def _quantized_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
        groups = k // self.group_size
        return {
            "q_weight": ((n, k // 8), self.storage_dtype),
            "q_scale": ((n, groups), self.model_dtype),
            "q_zeros": ((n, -(-groups // 8)), self.storage_dtype),
        }


def cast_to_model_dtype(w: torch.Tensor, model_dtype: str, name: str) -> np.ndarray:
    """A parameter that is not quantized, as a NumPy array in `model_dtype`; refuses overflow."""
    with np.errstate(over="ignore"):  # overflow is reported below, naming the parameter
        arr = w.detach().to("cpu", torch.float32).numpy().astype(model_dtype)
    if model_dtype == "float16" and not np.isfinite(arr).all():
        peak = float(w.abs().max())
        raise MlccError("convert_weight", f"{name}: max |w| = {peak:.6g} overflows float16 "
                        "(max 65504); use a float32 scheme such as q0f32 or q4f32_1")
    return arr


SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        NoQuant(name="q0f16", model_dtype="float16"),
        NoQuant(name="q0f32", model_dtype="float32"),
        GroupQuant(name="q3f16_1", bits=3, group_size=40, model_dtype="float16"),
        GroupQuant(name="q4f16_1", bits=4, group_size=32, model_dtype="float16"),
        GroupQuant(name="q4f32_1", bits=4, group_size=32, model_dtype="float32"),
        GroupQuant(name="q8f16_1", bits=8, group_size=32, model_dtype="float16"),
        AWQQuant(name="q4f16_awq", bits=4, group_size=128, model_dtype="float16"),
    )
}


def get_scheme(name: str) -> QuantScheme:
    """The scheme called `name`; MlccError listing the known names otherwise."""
    if name not in SCHEMES:
        raise MlccError("quantization", f"unknown quantization {name!r}; known: "
                        f"{', '.join(SCHEMES)}")
    return SCHEMES[name]
