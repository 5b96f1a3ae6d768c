"""Test support for architecture parity: tiny random HF models against ReferenceModel.

A tiny model keeps the structure of the real one (head layout, biases, tying, activations) at
small and, where the real model has them, odd sizes. Every parameter is redrawn at random,
biases and norm weights included (HF initializes many of them to 0 or 1, which would hide a
missing or misplaced tensor). The model is saved with `save_pretrained` plus an MLC-style
`prefill_chunk_size` in config.json, then read back by mlcc from the folder.

The schedule checked is a 9-token prompt fed in prefill chunks of 4 (logits after each chunk:
positions 3, 7 and 8) followed by 8 decode steps (positions 9 to 16).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

PROMPT, DECODE, CHUNK = 9, 8, 4
ATOL = 1e-4


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.25) -> torch.nn.Module:
    """Redraw every parameter: norm weights near 1, everything else N(0, scale)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
            value = 1.0 + 0.2 * noise if is_norm and param.ndim == 1 else scale * noise
            param.copy_(value.to(param.dtype))
    return model.eval()


def save_tiny(model: torch.nn.Module, path: Path, **config_extra) -> Path:
    """save_pretrained, then add MLC-style keys (the prefill chunk) to config.json."""
    model.save_pretrained(path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"prefill_chunk_size": CHUNK, **config_extra})
    config_path.write_text(json.dumps(config, indent=2))
    return path


def token_ids(vocab: int, n: int = PROMPT + DECODE, seed: int = 11) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Logits at every position of one causal forward pass, float32 (len(ids), vocab)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def stepwise_logits(engine, ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """(positions, logits) of the schedule: prompt chunks one append each, then decodes."""
    engine.reset()
    positions, logits = [], []
    for start in range(0, PROMPT, CHUNK):
        chunk = ids[start:min(start + CHUNK, PROMPT)]
        logits.append(np.asarray(engine.append(chunk), np.float32))
        positions.append(start + len(chunk) - 1)
    for index in range(PROMPT, PROMPT + DECODE):
        logits.append(np.asarray(engine.decode(ids[index]), np.float32))
        positions.append(index)
    return positions, logits


def assert_reference_matches_transformers(model: torch.nn.Module, path: Path,
                                          atol: float = ATOL) -> None:
    """ReferenceModel of the saved folder equals transformers at every step of the schedule."""
    from mlcc.runtime_check.reference import ReferenceModel

    ours = ReferenceModel(path, "q0f32")
    assert ours.prefill_chunk_size == CHUNK
    ids = token_ids(ours.vocab_size)
    expected = hf_logits(model, ids)
    assert expected.std() > 0.1  # logits large enough for the tolerance to mean something
    positions, got = stepwise_logits(ours, ids)
    assert positions == [3, 7, 8] + list(range(PROMPT, PROMPT + DECODE))
    assert ours.total_tokens == PROMPT + DECODE
    for position, logits in zip(positions, got):
        np.testing.assert_allclose(logits, expected[position], atol=atol, rtol=0,
                                   err_msg=f"{path.name}: position {position}")
