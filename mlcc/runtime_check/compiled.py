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
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from mlcc.errors import MlccError
from mlcc.runtime_check.device_logits import DeviceLogits, DeviceSampler
from mlcc.runtime_check.engine import EngineHelpers
from mlcc.runtime_check.library_info import LibraryInfo
from mlcc.runtime_check.tensor_parallel import check_rank, shard_arrays

STAGE = "runtime"
# The calling convention and metadata layout this runtime speaks; compile writes it into every
# library, and a library with another value is refused instead of being misread.
LIBRARY_ABI = 2


def read_metadata(lib) -> dict:
    """The JSON metadata a library carries (see mlcc.backends.llvm.codegen)."""
    try:
        nbytes = int(lib["mlcc_metadata_nbytes"]())
    except (AttributeError, RuntimeError, ValueError) as err:
        raise MlccError(STAGE, f"the library has no mlcc metadata ({err}); was it built by "
                        "`mlcc compile`?") from None
    out = np.zeros(nbytes, np.uint8)
    lib["mlcc_metadata"](out)
    metadata = json.loads(out.tobytes().decode())
    if metadata.get("abi") != LIBRARY_ABI:
        raise MlccError(STAGE, f"the library was built by {metadata.get('compiler', 'another mlcc')}"
                        f" with library ABI {metadata.get('abi', 1)}; this runtime needs ABI "
                        f"{LIBRARY_ABI}: compile it again with this mlcc")
    return metadata


def _device(name: str):
    import tvm

    if name in ("cpu", "llvm", "auto"):
        return tvm.cpu(0)
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        index = int(name[5:]) if ":" in name else 0
        _load_cuda_runtime()
        if not tvm.cuda(index).exist:
            raise MlccError(STAGE, f"device {name}: no CUDA GPU {index} is visible to the TVM "
                            "runtime; check nvidia-smi and CUDA_VISIBLE_DEVICES")
        return tvm.cuda(index)
    raise MlccError(STAGE, f"device {name!r} is not supported by this runtime; use cpu or cuda[:N]")


def _load_cuda_runtime() -> None:
    """Runtime-only TVM does not load its CUDA runtime library by itself; load it once."""
    import tvm

    if tvm.cuda(0).exist:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_GLOBAL",
                        extra_lib_paths=tvm.libinfo.package_lib_paths())
    except OSError as err:
        raise MlccError(STAGE, f"cannot load libtvm_runtime_cuda ({err}); it needs "
                        "libcudart.so.13 and the CUDA driver (libcuda.so.1)") from None


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


class DecodeGraph:
    """The decode entry captured once as a CUDA graph (through torch) and replayed per token.

    The token and the position live in fixed device buffers that each step overwrites before
    the replay; the first step runs the entry normally (loading modules, touching memory), then
    captures it without running it again.
    """

    def __init__(self, entry, page_table, kv_pool, params, logits, workspace, device) -> None:
        import tvm

        try:
            import torch
        except ImportError:
            raise MlccError(STAGE, "cudagraph=1 needs torch (CUDA build) to capture the decode "
                            "step; install it or run with cudagraph off") from None
        self.torch = torch
        self.entry = entry
        self.tokens = tvm.runtime.empty((1,), "int32", device)
        self.seq_info = tvm.runtime.empty((2,), "int32", device)
        self.args = (self.tokens, self.seq_info, page_table, kv_pool, *params, logits, workspace)
        self.graph = None

    def step(self, token_id: int, position: int) -> None:
        import tvm_ffi

        self.tokens.copyfrom(np.array([token_id], np.int32))
        self.seq_info.copyfrom(np.array([position, 0], np.int32))
        if self.graph is not None:
            self.graph.replay()
            return
        self.entry(*self.args)
        self.torch.cuda.synchronize()
        graph = self.torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(self.torch.cuda.graph(graph)):
            self.entry(*self.args)
        self.graph = graph


class GreedyGraph:
    """Greedy decoding with no host round trip between steps: the decode entry, the argmax of its
    logits written back as the next step's token, and the position advanced, captured as one
    CUDA graph (through torch). Step i also leaves its token in slot (position % 2) of a
    two-slot history; the host reads it on a side stream once step i is done, while step i + 1,
    queued before the read, runs. The first step runs the body normally, then captures it
    without running it again (as DecodeGraph)."""

    def __init__(self, entry, argmax_fn, page_table, kv_pool, params, logits, workspace,
                 device) -> None:
        import tvm

        try:
            import torch
        except ImportError:
            raise MlccError(STAGE, "cudagraph=1 needs torch (CUDA build) to capture the greedy "
                            "decode step; install it or run with cudagraph off") from None
        self.torch = torch
        self.entry, self.argmax_fn, self.logits = entry, argmax_fn, logits
        self.tokens = tvm.runtime.empty((1,), "int32", device)
        self.seq_info = tvm.runtime.empty((2,), "int32", device)
        self.args = (self.tokens, self.seq_info, page_table, kv_pool, *params, logits, workspace)
        self.t_tokens = torch.from_dlpack(self.tokens)
        self.t_seq = torch.from_dlpack(self.seq_info)
        self.history = torch.zeros(2, dtype=torch.int32, device=self.t_tokens.device)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.side = torch.cuda.Stream(device=self.t_tokens.device)
        self.graph = None

    def _body(self) -> None:
        torch = self.torch
        self.entry(*self.args)
        self.argmax_fn(self.logits, self.tokens)
        slot = torch.remainder(self.t_seq[:1], 2).long()
        self.history.index_copy_(0, slot, self.t_tokens)
        self.t_seq[:1] += 1

    def start(self, token_id: int, position: int) -> None:
        """The first token and its position, for the next `launch`."""
        self.tokens.copyfrom(np.array([token_id], np.int32))
        self.seq_info.copyfrom(np.array([position, 0], np.int32))

    def launch(self):
        """Queue one step; returns an event recorded after it."""
        import tvm_ffi

        torch = self.torch
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
                self._body()
            self.graph = graph
        event = torch.cuda.Event()
        event.record()
        return event

    def token(self, event, position: int) -> int:
        """The token of the step at `position`, once its event has passed."""
        event.synchronize()
        slot = position % 2
        with self.torch.cuda.stream(self.side):
            self.host.copy_(self.history[slot:slot + 1], non_blocking=True)
        self.side.synchronize()
        return int(self.host[0])


class CompiledEngine(EngineHelpers, LibraryInfo):
    """The engine contract on top of a compiled library."""

    def __init__(self, lib_path: str | Path, params: str | Path | Mapping[str, np.ndarray],
                 chat_config: dict | None = None, device: str = "cpu",
                 cudagraph: bool | None = None, tensor_parallel_rank: int | None = None) -> None:
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
        # A library compiled for N shards runs as rank r of N (mlcc.runtime_check.tensor_parallel)
        # on its slice of the unsharded weights.
        self.tensor_parallel_rank = check_rank(self.metadata, tensor_parallel_rank, lib_path)
        arrays = self._load_params(params)
        self.params = [tvm.runtime.tensor(arrays[p["name"]], self.device)
                       for p in self.metadata["params"]]
        layout = self.metadata["kv_layout"]
        self.layout = layout
        pool_shape = (layout["layers"], layout["pages"], 2, layout["kv_heads"],
                      layout["page_size"], layout["head_dim"])
        self.kv_pool = tvm.runtime.empty(pool_shape, layout["dtype"], self.device)
        # Sequence s owns pages [s * pages_per_seq, (s + 1) * pages_per_seq) of the pool.
        per_seq = layout["pages_per_seq"]
        self.max_sequences = layout["max_sequences"]
        self.page_tables = np.arange(per_seq * self.max_sequences, dtype=np.int32).reshape(
            self.max_sequences, per_seq)
        self._tables = [tvm.runtime.tensor(row, self.device) for row in self.page_tables]
        workspace = max(e["workspace_bytes"] for e in self.metadata["entries"].values())
        self.workspace = tvm.runtime.empty((max(workspace, 64),), "uint8", self.device)
        config = self.metadata["model_config"]
        self.logits = tvm.runtime.empty((config["vocab_size"],), "float32", self.device)
        self.seq_info = np.zeros(2, np.int32)
        self._prefill = self.lib["prefill"]
        self._decode = self.lib["decode"]
        self._batch_decode = self.lib["batch_decode"] if "batch_decode" in \
            self.metadata["entries"] else None
        self.lengths = [0] * self.max_sequences
        self.sequence = 0  # the sequence that reset/append/decode work on
        # CUDA graph of the decode step, one per sequence (each has its own page table row).
        self._graphs: dict[int, DecodeGraph] = {}
        self._greedy: dict[int, GreedyGraph] = {}  # the greedy loop's graphs, likewise
        if cudagraph is None:
            # The library's opt level asks for it; capture needs torch, else decode runs plain.
            cudagraph = "cudagraph" in str(self.metadata.get("opt", "")) and _has_torch()
        self.cudagraph = bool(cudagraph) and self.device.dlpack_device_type() == 2
        # CUDA libraries pick the next token on the GPU (mlcc.runtime_check.device_logits).
        self.device_sampler = (DeviceSampler(self.lib, self.device)
                               if self.device.dlpack_device_type() == 2
                               and self.metadata.get("device_sampling") else None)
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
        arrays = shard_arrays(arrays, self.metadata, self.tensor_parallel_rank)
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
    def total_tokens(self) -> int:
        return self.lengths[self.sequence]

    @property
    def length(self) -> int:
        return self.lengths[self.sequence]

    def select_sequence(self, index: int) -> None:
        """Make sequence `index` the one that reset/append/decode work on."""
        if not 0 <= index < self.max_sequences:
            raise MlccError(STAGE, f"sequence {index} does not exist: the library holds "
                            f"{self.max_sequences} (compile with max_batch_size to hold more)")
        self.sequence = index

    def reset(self) -> None:
        self.lengths[self.sequence] = 0

    def _check_room(self, sequence: int, n: int) -> None:
        limit = self.layout["max_positions"]
        if limit > 0 and self.lengths[sequence] + n > limit:
            raise MlccError(STAGE, f"{self.lengths[sequence]} cached + {n} new tokens exceed the "
                            f"context window of {limit}; reset the conversation")

    def _run(self, entry, ids: np.ndarray) -> None:
        import tvm

        self.seq_info[0] = self.lengths[self.sequence]
        tokens = tvm.runtime.tensor(ids, self.device)
        seq_info = tvm.runtime.tensor(self.seq_info, self.device)
        entry(tokens, seq_info, self._tables[self.sequence], self.kv_pool, *self.params,
              self.logits, self.workspace)
        self.lengths[self.sequence] += int(ids.shape[0])

    def _result(self, on_device: bool):
        """The logits row: on the host, or left on the GPU when asked and possible."""
        if on_device and self.device_sampler is not None:
            return DeviceLogits(self.logits, self.device_sampler)
        return self.logits.numpy()

    def append(self, token_ids: Sequence[int], on_device: bool = False) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise MlccError(STAGE, "append needs at least one token")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise MlccError(STAGE, f"token ids must be in [0, {self.vocab_size}), got "
                            f"{ids.min()}..{ids.max()}")
        self._check_room(self.sequence, ids.size)
        chunk = self.prefill_chunk_size
        for start in range(0, ids.size, chunk):
            self._run(self._prefill, ids[start:start + chunk])
        return self._result(on_device)

    def decode(self, token_id: int, on_device: bool = False) -> np.ndarray:
        if not 0 <= int(token_id) < self.vocab_size:
            raise MlccError(STAGE, f"token id {token_id} is outside [0, {self.vocab_size})")
        self._check_room(self.sequence, 1)
        if self.cudagraph:
            self._decode_graph(int(token_id))
        else:
            self._run(self._decode, np.array([token_id], np.int32))
        return self._result(on_device)

    def _decode_graph(self, token_id: int) -> None:
        """One decode step replayed from a CUDA graph captured on first use (needs torch)."""
        graph = self._graphs.get(self.sequence)
        if graph is None:
            graph = DecodeGraph(self._decode, self._tables[self.sequence], self.kv_pool,
                                self.params, self.logits, self.workspace, self.device)
            self._graphs[self.sequence] = graph
        graph.step(token_id, self.lengths[self.sequence])
        self.lengths[self.sequence] += 1

    def generate_greedy(self, token_ids: Sequence[int], n: int) -> list[int]:
        """`n` tokens, each the argmax of the logits before it, after `token_ids` (the decode
        steps through decode_greedy)."""
        self.reset()
        logits = self.append(token_ids, on_device=True)
        if n <= 0:
            return []
        first = logits.argmax() if isinstance(logits, DeviceLogits) else int(np.argmax(logits))
        return [first] + self.decode_greedy(first, n - 1)

    def decode_greedy(self, token_id: int, steps: int,
                      stop_ids: Collection[int] = ()) -> list[int]:
        """Greedy tokens after `token_id`: decode it and take the argmax, decode that, ... for
        `steps` tokens or until one of `stop_ids` (included). The same tokens and engine state
        as that loop over `decode`: the returned last token is not yet in the cache. With the
        CUDA graph and the GPU sampler the loop runs on the GPU a step ahead of the host
        (GreedyGraph); a step queued past a stop token only writes a cache slot that the next
        append or decode overwrites."""
        if steps < 0:
            raise MlccError(STAGE, f"decode_greedy needs steps >= 0, got {steps}")
        if not 0 <= int(token_id) < self.vocab_size:
            raise MlccError(STAGE, f"token id {token_id} is outside [0, {self.vocab_size})")
        if steps == 0:
            return []
        self._check_room(self.sequence, steps)
        stops = {int(t) for t in stop_ids}
        out: list[int] = []
        if not (self.cudagraph and self.device_sampler is not None):
            token = int(token_id)
            for _ in range(steps):
                logits = self.decode(token, on_device=True)
                token = (logits.argmax() if isinstance(logits, DeviceLogits)
                         else int(np.argmax(logits)))
                out.append(token)
                if token in stops:
                    break
            return out
        graph = self._greedy.get(self.sequence)
        if graph is None:
            graph = GreedyGraph(self._decode, self.device_sampler.argmax_fn,
                                self._tables[self.sequence], self.kv_pool, self.params,
                                self.logits, self.workspace, self.device)
            self._greedy[self.sequence] = graph
        start = self.lengths[self.sequence]
        graph.start(int(token_id), start)
        event = graph.launch()
        for i in range(steps):
            following = graph.launch() if i + 1 < steps else None
            out.append(graph.token(event, start + i))
            event = following
            if out[-1] in stops:
                break
        self.lengths[self.sequence] = start + len(out)
        return out

    def batch_decode(self, token_ids: Sequence[int]) -> np.ndarray:
        """One step of sequences 0..B-1 at once (token i goes to sequence i): f32[B, vocab]."""
        import tvm

        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if self._batch_decode is None:
            raise MlccError(STAGE, "this library has no batch_decode; compile with "
                            "--overrides max_batch_size=N (N > 1)")
        if not 0 < ids.size <= self.max_sequences:
            raise MlccError(STAGE, f"batch of {ids.size} sequences; the library holds "
                            f"1..{self.max_sequences}")
        for seq in range(ids.size):
            self._check_room(seq, 1)
        logits = tvm.runtime.empty((ids.size, self.vocab_size), "float32", self.device)
        self._batch_decode(tvm.runtime.tensor(ids, self.device),
                           tvm.runtime.tensor(np.array(self.lengths[:ids.size], np.int32),
                                              self.device),
                           tvm.runtime.tensor(self.page_tables[:ids.size], self.device),
                           self.kv_pool, *self.params, logits, self.workspace)
        for seq in range(ids.size):
            self.lengths[seq] += 1
        return logits.numpy()
