"""CompiledEngine: runs a model library built by `mlcc compile` with the TVM runtime alone.

It reads the library's metadata, loads the parameters from the params folder (checking names,
shapes and dtypes against the metadata), allocates the KV page pool, the page table, the
workspace and the logits once, and calls one compiled entry per prefill chunk and per decoded
token. It implements the engine contract (reset / append / decode) and the parity methods of
ReferenceModel. Nothing here imports the compiler: set TVM_USE_RUNTIME_LIB=1 to load only
libtvm_runtime.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mlcc.errors import MlccError

STAGE = "runtime"


def read_metadata(lib) -> dict:
    """The JSON metadata a library carries (see mlcc.backends.llvm.codegen)."""
    try:
        nbytes = int(lib["mlcc_metadata_nbytes"]())
    except (AttributeError, RuntimeError, ValueError) as err:
        raise MlccError(STAGE, f"the library has no mlcc metadata ({err}); was it built by "
                        "`mlcc compile`?") from None
    out = np.zeros(nbytes, np.uint8)
    lib["mlcc_metadata"](out)
    return json.loads(out.tobytes().decode())


def _device(name: str):
    import tvm

    if name not in ("cpu", "llvm", "auto"):
        raise MlccError(STAGE, f"device {name!r}: this runtime runs CPU libraries; use cpu")
    return tvm.cpu(0)


class CompiledEngine:
    """The engine contract on top of a compiled library."""

    def __init__(self, lib_path: str | Path, params: str | Path | Mapping[str, np.ndarray],
                 chat_config: dict | None = None, device: str = "cpu") -> None:
        import tvm

        lib_path = Path(lib_path)
        if not lib_path.is_file():
            raise MlccError(STAGE, f"model library {lib_path} does not exist; build it with "
                            "`mlcc compile`")
        self.device = _device(device)
        load_start = time.perf_counter()
        self.lib = tvm.runtime.load_module(str(lib_path))
        self.metadata = read_metadata(self.lib)
        self._check_config(chat_config, lib_path)
        arrays = self._load_params(params)
        self.params = [tvm.runtime.tensor(arrays[p["name"]], self.device)
                       for p in self.metadata["params"]]
        layout = self.metadata["kv_layout"]
        self.layout = layout
        pool_shape = (layout["layers"], layout["pages"], 2, layout["kv_heads"],
                      layout["page_size"], layout["head_dim"])
        self.kv_pool = tvm.runtime.empty(pool_shape, layout["dtype"], self.device)
        self.page_table = tvm.runtime.tensor(np.arange(layout["pages"], dtype=np.int32),
                                             self.device)
        workspace = max(e["workspace_bytes"] for e in self.metadata["entries"].values())
        self.workspace = tvm.runtime.empty((max(workspace, 64),), "uint8", self.device)
        config = self.metadata["model_config"]
        self.logits = tvm.runtime.empty((config["vocab_size"],), "float32", self.device)
        self.seq_info = np.zeros(2, np.int32)
        self._prefill = self.lib["prefill"]
        self._decode = self.lib["decode"]
        self.length = 0
        self.load_seconds = time.perf_counter() - load_start

    # --- loading and checks ------------------------------------------------------------

    def _check_config(self, chat: dict | None, lib_path: Path) -> None:
        if chat is None:
            return
        meta = self.metadata
        for key in ("model_type", "quantization"):
            if chat.get(key) != meta[key]:
                raise MlccError(STAGE, f"{lib_path.name} was compiled for {key} "
                                f"{meta[key]!r} but the params folder says {chat.get(key)!r}; "
                                "compile the library from this folder's mlc-chat-config.json")

    def _load_params(self, params) -> Mapping[str, np.ndarray]:
        if isinstance(params, Mapping):
            arrays = params
            where = "the given arrays"
        else:
            from mlcc.frontend.ndarray_cache import load_ndarray_cache

            arrays = load_ndarray_cache(params)
            where = str(params)
        expected = self.metadata["params"]
        for p in expected:
            if p["name"] not in arrays:
                raise MlccError(STAGE, f"parameter {p['name']} ({p['dtype']}{p['shape']}) is "
                                f"missing from {where}: the weights do not match this library "
                                f"({self.metadata['model_type']}, {self.metadata['quantization']}"
                                "); convert them with the same model and quantization")
            a = arrays[p["name"]]
            if list(a.shape) != p["shape"] or str(a.dtype) != p["dtype"]:
                raise MlccError(STAGE, f"parameter {p['name']}: the library expects "
                                f"{p['dtype']}{p['shape']}, {where} has {a.dtype}{list(a.shape)}; "
                                f"the weights are for another model or quantization than "
                                f"{self.metadata['quantization']}")
        return arrays

    # --- engine contract ---------------------------------------------------------------

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
        return self.metadata["symbol_bounds"]["seq_len"]

    @property
    def total_tokens(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0

    def _check_room(self, n: int) -> None:
        limit = self.layout["max_positions"]
        if limit > 0 and self.length + n > limit:
            raise MlccError(STAGE, f"{self.length} cached + {n} new tokens exceed the context "
                            f"window of {limit}; reset the conversation")

    def _run(self, entry, ids: np.ndarray) -> None:
        import tvm

        self.seq_info[0] = self.length
        tokens = tvm.runtime.tensor(ids, self.device)
        seq_info = tvm.runtime.tensor(self.seq_info, self.device)
        entry(tokens, seq_info, self.page_table, self.kv_pool, *self.params, self.logits,
              self.workspace)
        self.length += int(ids.shape[0])

    def append(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise MlccError(STAGE, "append needs at least one token")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise MlccError(STAGE, f"token ids must be in [0, {self.vocab_size}), got "
                            f"{ids.min()}..{ids.max()}")
        self._check_room(ids.size)
        chunk = self.prefill_chunk_size
        for start in range(0, ids.size, chunk):
            self._run(self._prefill, ids[start:start + chunk])
        return self.logits.numpy()

    def decode(self, token_id: int) -> np.ndarray:
        if not 0 <= int(token_id) < self.vocab_size:
            raise MlccError(STAGE, f"token id {token_id} is outside [0, {self.vocab_size})")
        self._check_room(1)
        self._run(self._decode, np.array([token_id], np.int32))
        return self.logits.numpy()

    def prefill_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        self.reset()
        return self.append(token_ids)

    def decode_logits(self, token_id: int) -> np.ndarray:
        return self.decode(token_id)

    def generate_greedy(self, token_ids: Sequence[int], n: int) -> list[int]:
        logits = self.prefill_logits(token_ids)
        out = []
        for _ in range(n):
            token = int(np.argmax(logits))
            out.append(token)
            if len(out) < n:
                logits = self.decode(token)
        return out
