"""The peer: HF transformers running the same checkpoint through torch on the CPU.

Greedy, batch 1, a DynamicCache carried between calls; prefill computes the logits of the last
position only (`logits_to_keep=1`, as `generate()` does), so it does the same work as an mlcc
library compiled with lm_head_last_row. torch uses `threads` intra-op threads, the same count the
TVM runtime gets.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class TorchRunner:
    """`prefill`/`decode` (see benchmarks.measure.Runner) on a transformers causal LM."""

    def __init__(self, hf_dir: str | Path, dtype: str, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=getattr(torch, dtype)).eval()
        self.attention = getattr(self.model.config, "_attn_implementation", None)
        # transformers 5 renamed `past_key_values` to `cache` (argument and output)
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.past = None

    def _step(self, ids: list[list[int]], past) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor(ids), use_cache=True, logits_to_keep=1,
                             **{self.cache_name: past})
        self.past = out[self.cache_name]
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self._step([list(ids)], None)

    def decode(self, token: int) -> np.ndarray:
        return self._step([[int(token)]], self.past)
