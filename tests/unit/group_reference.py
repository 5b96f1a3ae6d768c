"""An independent NumPy reading of design.md §5's group quantization, shared by the tests.

It is written group by group and word by word with Python integers, without mlcc.quant, so that
the byte-exact test (tests/unit/test_quant_group.py) and the fidelity test against transformers
(tests/e2e/test_quant_fidelity_hf.py) judge mlcc's quantizer by a second implementation.
"""

from __future__ import annotations

import numpy as np


def reference_quantize(w: np.ndarray, bits: int, group: int, scale_dtype: str):
    """design.md §5 written out group by group and word by word with Python integers."""
    max_int = 2 ** (bits - 1) - 1
    per_word = 32 // bits
    n, k = w.shape
    k_pad = k
    while k_pad % group or k_pad % per_word:
        k_pad += 1
    padded = np.zeros((n, k_pad), dtype=np.float32)
    padded[:, :k] = w
    scales = np.zeros((n, k_pad // group), dtype=scale_dtype)
    codes = np.zeros((n, k_pad), dtype=np.int64)
    for row in range(n):
        for g in range(k_pad // group):
            chunk = padded[row, g * group:(g + 1) * group]
            stored = (np.float32(np.max(np.abs(chunk))) / np.float32(max_int)).astype(scale_dtype)
            scales[row, g] = stored
            step = np.float32(stored) if stored != 0 else np.float32(1)
            chunk_codes = np.rint(chunk / step).astype(np.int64) + max_int
            codes[row, g * group:(g + 1) * group] = np.minimum(np.maximum(chunk_codes, 0),
                                                               2 * max_int)
    words = np.zeros((n, k_pad // per_word), dtype=np.uint32)
    for row in range(n):
        for i in range(k_pad // per_word):
            word = 0
            for j in range(per_word):
                word |= int(codes[row, i * per_word + j]) << (j * bits)
            words[row, i] = word
    return words, scales, codes


def reference_dequantize(w: np.ndarray, bits: int, group: int, scale_dtype: str) -> np.ndarray:
    """The float32 weight that `reference_quantize(w, ...)` stands for, as the model reads it.

    (code - max_int) * scale in float32, then rounded through the scale dtype: the IR's
    q_linear and q_embedding dequantize in the dtype of q_scale (mlcc/ir/quant_ops.py), so the
    rounding is part of the scheme's definition, not an artefact of one implementation.
    """
    _, scales, codes = reference_quantize(w, bits, group, scale_dtype)
    max_int = 2 ** (bits - 1) - 1
    step = np.repeat(scales.astype(np.float32), group, axis=1)
    values = (codes - max_int).astype(np.float32) * step
    return values[:, :w.shape[1]].astype(scale_dtype).astype(np.float32)
