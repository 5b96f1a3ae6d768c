"""Logits that stay on the GPU until something reads them.

A CUDA library carries two sampling kernels (mlcc.backends.cuda.sampling): `mlcc_argmax` and
`mlcc_sample` (softmax with temperature, then a draw from a given uniform number). The
compiled engine hands out `DeviceLogits` when asked (`append(ids, on_device=True)`,
`decode(id, on_device=True)`); `TokenSampler.sample` then picks greedy tokens and
temperature-only draws on the GPU and brings back one int32 instead of the whole row. Any
other use (`np.asarray`, repetition penalty, top-p) downloads the row once.
"""

from __future__ import annotations

import numpy as np


class DeviceSampler:
    """The library's sampling kernels with their small device buffers, made once per engine."""

    def __init__(self, lib, device) -> None:
        import tvm

        self.argmax_fn = lib["mlcc_argmax"]
        self.sample_fn = lib["mlcc_sample"]
        self.token = tvm.runtime.empty((1,), "int32", device)
        self.params = tvm.runtime.empty((2,), "float64", device)

    def argmax(self, logits) -> int:
        self.argmax_fn(logits, self.token)
        return int(self.token.numpy()[0])

    def sample(self, logits, temperature: float, u: float) -> int:
        self.params.copyfrom(np.array([temperature, u], np.float64))
        self.sample_fn(logits, self.params, self.token)
        return int(self.token.numpy()[0])


class DeviceLogits:
    """One float32 logits row on the GPU; read as an array it is downloaded (once).

    It is the engine's logits buffer itself: valid until the engine's next append or decode.
    """

    on_device = True

    def __init__(self, tensor, sampler: DeviceSampler) -> None:
        self.tensor = tensor
        self.sampler = sampler
        self._host: np.ndarray | None = None

    def argmax(self) -> int:
        """np.argmax of the row, computed on the GPU."""
        return self.sampler.argmax(self.tensor)

    def sample(self, temperature: float, u: float) -> int:
        """The first token whose cumulative softmax(row / temperature) mass exceeds u."""
        return self.sampler.sample(self.tensor, temperature, u)

    def numpy(self) -> np.ndarray:
        if self._host is None:
            self._host = self.tensor.numpy()
        return self._host

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)
