"""What an engine running a compiled library says about its model, read from the library's
metadata (`self.metadata`): the sizes of the runtime engine contract."""

from __future__ import annotations


class LibraryInfo:
    """Mixin for engines that hold a library's metadata dict as `self.metadata`."""

    metadata: dict

    @property
    def config(self) -> dict:
        return self.metadata["model_config"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def context_window_size(self) -> int:
        return self.config["context_window_size"]

    @property
    def sliding_window_size(self) -> int:
        return self.config["sliding_window_size"]

    @property
    def prefill_chunk_size(self) -> int:
        """The most tokens one prefill call takes: the bound compiled for seq_len."""
        return self.metadata["symbol_bounds"]["seq_len"]
