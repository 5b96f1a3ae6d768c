"""The peer: HF transformers running the same checkpoint through torch, on the CPU or a GPU.

Greedy, batch 1; prefill computes the logits of the last position only (`logits_to_keep=1`, as
`generate()` does), so it does the same work as an mlcc library compiled with lm_head_last_row.
On the CPU torch uses `threads` intra-op threads, the same count the TVM runtime gets.

`TorchRunner` is transformers eager with a DynamicCache carried between calls. `CompiledRunner`
(GPU only) is transformers' documented fast path: a StaticCache and the model's forward compiled
with torch.compile (mode "reduce-overhead": CUDA graphs) for the one-token decode step; prefill
runs the same forward uncompiled into the static cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class TorchLogits:
    """A logits row left on the GPU, as mlcc's DeviceLogits: the greedy pick runs there
    (benchmarks.measure.pick_greedy) and only reading it as an array downloads it."""

    on_device = True

    def __init__(self, row) -> None:
        self.row = row

    def argmax(self) -> int:
        return int(self.row.argmax().item())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        host = self.row.float().cpu().numpy()
        return host if dtype is None else host.astype(dtype)


def _row(logits, device: str):
    """The last position's logits: kept on a GPU, else a float32 NumPy row."""
    row = logits[0, -1]
    return TorchLogits(row) if device.startswith("cuda") else row.float().cpu().numpy()


def _load(hf_dir: str | Path, dtype: str, device: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


class TorchRunner:
    """`prefill`/`decode` (see benchmarks.measure.Runner) on a transformers causal LM."""

    def __init__(self, hf_dir: str | Path, dtype: str, threads: int,
                 device: str = "cpu") -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.model = _load(hf_dir, dtype, device)
        self.attention = getattr(self.model.config, "_attn_implementation", None)
        # transformers 5 renamed `past_key_values` to `cache` (argument and output)
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.past = None

    def _step(self, ids: list[list[int]], past) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor(ids, device=self.device), use_cache=True,
                             logits_to_keep=1, **{self.cache_name: past})
        self.past = out[self.cache_name]
        return _row(out.logits, self.device)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self._step([list(ids)], None)

    def decode(self, token: int) -> np.ndarray:
        return self._step([[int(token)]], self.past)


class CompiledRunner:
    """transformers float16 on a GPU with a StaticCache of `max_len` positions and a
    torch.compile'd decode step."""

    def __init__(self, hf_dir: str | Path, max_len: int, device: str = "cuda") -> None:
        import torch
        import transformers

        self.torch = torch
        self.device = device
        self.model = _load(hf_dir, "float16", device)
        self.attention = getattr(self.model.config, "_attn_implementation", None)
        wanted = {"config": self.model.config, "max_cache_len": max_len, "max_batch_size": 1,
                  "device": device, "dtype": torch.float16}
        accepted = inspect.signature(transformers.StaticCache.__init__).parameters
        self.cache = transformers.StaticCache(**{k: v for k, v in wanted.items()
                                                 if k in accepted})
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        mode = "reduce-overhead" if device.startswith("cuda") else None  # CUDA graphs
        self.step = torch.compile(self.model.forward, mode=mode, fullgraph=True)
        self.position = 0

    def _run(self, forward, ids: list[int]) -> np.ndarray:
        torch = self.torch
        positions = torch.arange(self.position, self.position + len(ids), device=self.device)
        # no_grad, not inference_mode: the cache is written in place by reset() and by the
        # compiled step, which inference tensors forbid outside inference mode
        with torch.no_grad():
            out = forward(torch.tensor([ids], device=self.device), cache_position=positions,
                          use_cache=True, logits_to_keep=1, **{self.cache_name: self.cache})
        self.position += len(ids)
        return _row(out.logits, self.device)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        with self.torch.no_grad():
            self.cache.reset()
        self.position = 0
        return self._run(self.model.forward, list(ids))

    def decode(self, token: int) -> np.ndarray:
        return self._run(self.step, [int(token)])
