"""transformers' LlamaForCausalLM run on weights quantized and dequantized without mlcc.quant.

The weights come from tests/unit/group_reference.py (the NumPy reading of design.md §5 that the
byte-exact test uses), with the scheme parameters written out here from design.md rather than
read from mlcc, so that a wrong entry in mlcc's scheme registry shows up as a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

# group_reference lives with the unit tests; this folder is not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from group_reference import reference_dequantize

# mode: (bits, group size, dtype of scales and activations); bits 0 = stored unquantized.
DESIGN_SCHEMES = {
    "q0f32": (0, 0, "float32"),
    "q0f16": (0, 0, "float16"),
    "q3f16_1": (3, 40, "float16"),
    "q4f16_1": (4, 32, "float16"),
    "q4f32_1": (4, 32, "float32"),
    "q8f16_1": (8, 32, "float16"),
}


def dequantized_weights(hf_dir: Path, mode: str) -> LlamaForCausalLM:
    """stories260K-like Llama in float32 whose weights are exactly what `mode` stores.

    Linear and embedding weights go through the reference quantizer and back (the tied lm_head
    follows the embedding); every other parameter, like the norms, is rounded through the mode's
    dtype, as convert_weight stores it.
    """
    bits, group, dtype = DESIGN_SCHEMES[mode]
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                             attn_implementation="eager")
    quantized = {id(m.weight) for m in model.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    with torch.no_grad():
        for param in model.parameters():
            w = param.detach().numpy()
            if bits and id(param) in quantized:
                w = reference_dequantize(w, bits, group, dtype)
            else:
                w = w.astype(dtype).astype(np.float32)
            param.copy_(torch.from_numpy(w))
    return model.eval()


def transformers_greedy(model: LlamaForCausalLM, prompt: list[int],
                        n: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the float32 logits row each was chosen from, (n, vocab), KV-cached."""
    tokens, rows = [], []
    # One decode step of a model this small is microseconds of work per thread; a second
    # thread only adds waiting, 20x slower on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model(torch.tensor([prompt]), use_cache=True)
            for _ in range(n):
                logits = out.logits[0, -1].float().numpy()
                rows.append(logits)
                tokens.append(int(np.argmax(logits)))
                if len(tokens) < n:
                    out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    finally:
        torch.set_num_threads(threads)
    return tokens, np.stack(rows)


def float16_step(x: float) -> float:
    """Distance between neighbouring float16 values at magnitude |x| (0 below the normals)."""
    x = abs(float(x))
    if x < 2.0 ** -14:
        return 2.0 ** -24
    return 2.0 ** (np.floor(np.log2(x)) - 10)
