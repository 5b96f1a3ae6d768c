"""What every engine offers on top of the runtime engine contract (`reset`, `append`,
`decode`): a fresh prefill, decode by its other name, and a greedy run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class EngineHelpers:
    """Mixin for engines that implement `reset`, `append(ids)` and `decode(id)`."""

    def prefill_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """The last position's logits after `token_ids` in a fresh sequence."""
        self.reset()
        return self.append(token_ids)

    def decode_logits(self, token_id: int) -> np.ndarray:
        return self.decode(token_id)

    def generate_greedy(self, token_ids: Sequence[int], n: int) -> list[int]:
        """`n` tokens, each the argmax of the logits before it, after `token_ids`."""
        device = keeps_logits_on_device(self)
        self.reset()
        logits = self.append(token_ids, on_device=True) if device else self.append(token_ids)
        out = []
        for _ in range(n):
            token = logits.argmax() if device else int(np.argmax(logits))
            out.append(token)
            if len(out) < n:
                logits = self.decode(token, on_device=True) if device else self.decode(token)
        return out


def keeps_logits_on_device(engine) -> bool:
    """Whether `engine.append`/`decode` can leave the logits on the GPU (on_device=True)."""
    return getattr(engine, "device_sampler", None) is not None
