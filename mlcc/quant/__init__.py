"""Quantization schemes (q0f16 ... q4f16_awq): registry, torch quantizers, NumPy dequantizers."""

from mlcc.quant.schemes import (
    SCHEMES,
    AWQQuant,
    GroupQuant,
    NoQuant,
    QuantScheme,
    StoredTensor,
    get_scheme,
)

__all__ = [
    "SCHEMES",
    "AWQQuant",
    "GroupQuant",
    "NoQuant",
    "QuantScheme",
    "StoredTensor",
    "get_scheme",
]
