"""Running a library compiled for N tensor-parallel shards: N ranks, one engine each, in step.

A sharded library is one program for every rank (see mlcc.passes.shard); rank r runs it on its
slice of the unsharded weights (`shard_arrays`, from the library's `tensor_parallel` metadata),
and its entries call the global function "mlcc.ccl.all_reduce"(src, dst, count, dtype) where
the ranks' partial results must be summed. This module provides that function and the ranks:

- on the CPU, N engines in N threads of this process; the sum is a NumPy sum behind a barrier
  (tests and the numerical check of the sharding; no NCCL needed);
- on CUDA, N worker processes, one per GPU, started here (tensor_parallel_workers); the sum is
  torch.distributed's NCCL all_reduce on the current stream, so the decode step's CUDA graph
  captures it and no Python runs per token. NCCL_NVLS_ENABLE=0 (no NVLink multicast) is set
  for every worker. The same workers run on the CPU with gloo.

`TensorParallelEngine` drives all ranks with the engine contract (reset / append / decode, plus
prefill_logits / decode_logits / generate_greedy) and returns rank 0's logits; every rank holds
the same logits, since every rank computes the replicated part of the model on the same sums.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlcc.errors import MlccError
from mlcc.ir.collective import ShardSpec, reduce_sum
from mlcc.runtime_check.library_info import LibraryInfo

STAGE = "runtime"
CCL_ALL_REDUCE = "mlcc.ccl.all_reduce"
BARRIER_TIMEOUT_S = 300.0
_LOCAL = threading.local()  # the rank group of the calling thread (CPU ranks)
_PROCESS_COMM: list[Any] = []  # the NCCL communicator of this worker process (CUDA ranks)


# --- weights -------------------------------------------------------------------------------


def library_shards(metadata: Mapping[str, Any]) -> int:
    """How many shards a library was compiled for (1 when it is not sharded)."""
    return int(metadata.get("tensor_parallel", {}).get("shards", 1))


def check_rank(metadata: Mapping[str, Any], rank: int | None, lib_path: Path | str) -> int | None:
    """The rank an engine runs as: None for an unsharded library, else 0 <= rank < shards."""
    shards = library_shards(metadata)
    if shards == 1:
        if rank not in (None, 0):
            raise MlccError(STAGE, f"{Path(lib_path).name} is not sharded; it runs as one engine "
                            f"(rank {rank} was asked): compile with --overrides "
                            "tensor_parallel_shards=N for tensor parallelism")
        return None
    if rank is None or not 0 <= rank < shards:
        raise MlccError(STAGE, f"{Path(lib_path).name} is compiled for tensor_parallel_shards="
                        f"{shards}; open it with ChatModule(..., tensor_parallel_shards={shards}) "
                        f"or TensorParallelEngine, which run ranks 0..{shards - 1}")
    return rank


def shard_arrays(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any],
                 rank: int | None) -> Mapping[str, np.ndarray]:
    """Rank `rank`'s parameters, sliced from the unsharded `arrays` as the library says."""
    info = metadata.get("tensor_parallel")
    if not info or rank is None:
        return arrays
    out = dict(arrays)
    for name, data in info["params"].items():
        if name not in arrays:
            continue  # reported by the engine as a missing parameter
        spec = ShardSpec.from_json(data)
        try:
            out[name] = spec.take(np.asarray(arrays[name]), rank)
        except ValueError as err:
            raise MlccError(STAGE, f"parameter {name}: cannot take shard {rank} of "
                            f"{spec.shards} from shape {list(np.shape(arrays[name]))} ({err}); "
                            "the weights are for another model than the library") from None
    return out


# --- the collective function the compiled entries call -------------------------------------


def _pointer(value: Any) -> int:
    return int(value.value or 0) if isinstance(value, ctypes.c_void_p) else int(value)


def _all_reduce(src: Any, dst: Any, count: int, dtype: str) -> None:
    comm = getattr(_LOCAL, "comm", None) or (_PROCESS_COMM[0] if _PROCESS_COMM else None)
    if comm is None:
        raise RuntimeError(f"[{STAGE}] {CCL_ALL_REDUCE} was called outside a tensor-parallel "
                           "group; run the sharded library through TensorParallelEngine")
    comm.all_reduce(_pointer(src), _pointer(dst), int(count), str(dtype))


def register_collectives() -> None:
    """Make "mlcc.ccl.all_reduce" callable from compiled code (idempotent)."""
    import tvm_ffi

    tvm_ffi.register_global_func(CCL_ALL_REDUCE, _all_reduce, override=True)


class HostRank:
    """Rank `rank` of a group of threads: sums host buffers through shared slots."""

    def __init__(self, group: HostGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_reduce(self, src: int, dst: int, count: int, dtype: str) -> None:
        self.group.all_reduce(self.rank, src, dst, count, dtype)


class HostGroup:
    """The ranks of one model in threads: every rank's input is summed in rank order."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.barrier = threading.Barrier(shards, timeout=BARRIER_TIMEOUT_S)
        self.slots: list[np.ndarray | None] = [None] * shards

    @staticmethod
    def view(pointer: int, count: int, dtype: str) -> np.ndarray:
        nbytes = count * np.dtype(dtype).itemsize
        raw = (ctypes.c_uint8 * nbytes).from_address(pointer)
        return np.frombuffer(raw, dtype=np.uint8).view(dtype)

    def all_reduce(self, rank: int, src: int, dst: int, count: int, dtype: str) -> None:
        self.slots[rank] = self.view(src, count, dtype).copy()
        self.barrier.wait()
        total = reduce_sum(self.slots)  # the same order on every rank: the same bits everywhere
        self.barrier.wait()  # nobody refills a slot before everybody has read them all
        self.view(dst, count, dtype)[:] = total


# --- ranks in threads (CPU) ----------------------------------------------------------------


class ThreadRanks:
    """N persistent threads; thread r always runs rank r's work with rank r's group handle."""

    def __init__(self, shards: int) -> None:
        register_collectives()
        self.group = HostGroup(shards)
        self.inbox = [queue.Queue() for _ in range(shards)]
        self.outbox = [queue.Queue() for _ in range(shards)]
        self.threads = [threading.Thread(target=self._serve, args=(r,), daemon=True,
                                         name=f"mlcc-rank{r}") for r in range(shards)]
        for t in self.threads:
            t.start()

    def _serve(self, rank: int) -> None:
        _LOCAL.comm = HostRank(self.group, rank)
        while True:
            work = self.inbox[rank].get()
            if work is None:
                return
            try:
                self.outbox[rank].put((True, work()))
            except BaseException as err:  # handed to the caller's thread
                self.group.barrier.abort()  # the other ranks must not wait for this one
                self.outbox[rank].put((False, err))

    def run(self, work: Sequence[Callable[[], Any]]) -> list[Any]:
        for rank, fn in enumerate(work):
            self.inbox[rank].put(fn)
        results = [box.get() for box in self.outbox]
        if self.group.barrier.broken:
            self.group.barrier.reset()
        for ok, value in results:
            if not ok and not isinstance(value, threading.BrokenBarrierError):
                raise value
        for ok, value in results:
            if not ok:
                raise value
        return [value for _, value in results]

    def close(self) -> None:
        for box in self.inbox:
            box.put(None)
        for t in self.threads:
            t.join(timeout=10)


# --- the engine ----------------------------------------------------------------------------


def _load_all(params: str | Path | Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    if isinstance(params, Mapping):
        return params
    from mlcc.frontend.ndarray_cache import load_ndarray_cache

    return load_ndarray_cache(params)


def _read_library_metadata(lib_path: Path) -> dict:
    import tvm

    from mlcc.runtime_check.compiled import read_metadata

    if not lib_path.is_file():
        raise MlccError(STAGE, f"model library {lib_path} does not exist; build it with "
                        "`mlcc compile ... --overrides tensor_parallel_shards=N`")
    return read_metadata(tvm.runtime.load_module(str(lib_path)))


class TensorParallelEngine(LibraryInfo):
    """The engine contract over N ranks of a sharded library.

    `workers`: "threads" (the CPU default: N engines in this process) or "processes" (the CUDA
    default: one worker process per GPU, NCCL; on the CPU, gloo).
    """

    def __init__(self, lib_path: str | Path, params: str | Path | Mapping[str, np.ndarray],
                 chat_config: dict | None = None, device: str = "cpu",
                 shards: int | None = None, cudagraph: bool | None = None,
                 workers: str = "auto") -> None:
        lib_path = Path(lib_path)
        metadata = _read_library_metadata(lib_path)
        compiled = library_shards(metadata)
        shards = compiled if shards is None else shards
        if compiled == 1 or shards != compiled:
            raise MlccError(STAGE, f"{lib_path.name} is compiled for tensor_parallel_shards="
                            f"{compiled}, not {shards}; compile it with --overrides "
                            f"tensor_parallel_shards={shards} or ask for {compiled} shards")
        self.shards = shards
        self.metadata = metadata
        if workers not in ("auto", "threads", "processes"):
            raise MlccError(STAGE, f"workers={workers!r}: use auto, threads or processes")
        if workers == "processes" or (workers == "auto" and device.startswith("cuda")):
            from mlcc.runtime_check.tensor_parallel_workers import ProcessRanks

            self.ranks = ProcessRanks(lib_path, params, chat_config, device, shards, cudagraph)
            self.engines = None
        elif device.startswith("cuda"):
            raise MlccError(STAGE, "GPU ranks run in worker processes (one per GPU); "
                            "workers='threads' is for the CPU")
        else:
            self._start_threads(lib_path, params, chat_config, device, cudagraph)

    def _start_threads(self, lib_path, params, chat_config, device, cudagraph) -> None:
        from mlcc.runtime_check.compiled import CompiledEngine

        arrays = _load_all(params)  # read once, sliced per rank
        self.ranks = ThreadRanks(self.shards)
        self.engines = self.ranks.run([
            (lambda r=r: CompiledEngine(lib_path, arrays, chat_config, device, cudagraph,
                                        tensor_parallel_rank=r)) for r in range(self.shards)])

    def _call(self, method: str, *args: Any) -> Any:
        if self.engines is None:
            return self.ranks.call(method, *args)
        results = self.ranks.run([(lambda e=e: getattr(e, method)(*args)) for e in self.engines])
        return results[0]

    # --- engine contract ---------------------------------------------------------------

    @property
    def total_tokens(self) -> int:
        return self._call("__getattribute__", "total_tokens")

    def reset(self) -> None:
        self._call("reset")

    def append(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._call("append", [int(t) for t in token_ids])

    def decode(self, token_id: int) -> np.ndarray:
        return self._call("decode", int(token_id))

    def prefill_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._call("prefill_logits", [int(t) for t in token_ids])

    def decode_logits(self, token_id: int) -> np.ndarray:
        return self.decode(token_id)

    def generate_greedy(self, token_ids: Sequence[int], n: int) -> list[int]:
        # Each rank runs the whole loop; their logits are equal, so are their tokens.
        return self._call("generate_greedy", [int(t) for t in token_ids], int(n))

    def set_cudagraph(self, enabled: bool) -> None:
        """Decode with (or without) the captured CUDA graph from the next step on."""
        self._call("__setattr__", "cudagraph", bool(enabled))

    def close(self) -> None:
        self.ranks.close()

    def __enter__(self) -> TensorParallelEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_environment() -> dict[str, str]:
    """What every worker process gets in its environment: no NVLink multicast."""
    return {**os.environ, "NCCL_NVLS_ENABLE": "0"}
