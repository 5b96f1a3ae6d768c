"""CUDA ranks of a sharded library: one worker process per GPU, summing through NCCL.

Each worker binds GPU `first + rank`, joins a torch.distributed NCCL group of all ranks, opens
the library as `CompiledEngine(..., tensor_parallel_rank=rank)` and serves calls from the parent
over a pipe. "mlcc.ccl.all_reduce" in a worker is `dist.all_reduce` on a torch view of the
engine's workspace, issued on the current stream: in a plain call that is the stream TVM runs on,
and while the decode step is captured it is the capture stream, so the all_reduce becomes a node
of the CUDA graph and a replay runs no Python.

Workers start with the "spawn" method (CUDA cannot be used across fork) and NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlcc.errors import MlccError
from mlcc.runtime_check.tensor_parallel import (
    _PROCESS_COMM,
    STAGE,
    free_port,
    register_collectives,
)

START_TIMEOUT_S = float(os.environ.get("MLCC_TP_START_TIMEOUT", "1800"))
CALL_TIMEOUT_S = float(os.environ.get("MLCC_TP_CALL_TIMEOUT", "600"))


def _first_gpu(device: str) -> int:
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise MlccError(STAGE, f"device {device!r}: tensor parallelism on GPUs takes cuda or cuda:N "
                    "(the first of the GPUs used)")


def check_cuda_group(shards: int, first: int) -> None:
    """torch with NCCL is there and enough GPUs are visible; one clear line otherwise."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise MlccError(STAGE, f"tensor_parallel_shards={shards} on CUDA needs torch with "
                        f"torch.distributed and NCCL ({err}); install the CUDA build of torch"
                        ) from None
    if not dist.is_available() or not dist.is_nccl_available():
        raise MlccError(STAGE, f"tensor_parallel_shards={shards} on CUDA needs NCCL, but this "
                        f"torch ({torch.__version__}) has no NCCL backend; install the CUDA "
                        "build of torch")
    count = torch.cuda.device_count()
    if first + shards > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        raise MlccError(STAGE, f"tensor_parallel_shards={shards} starting at cuda:{first} needs "
                        f"GPUs {first}..{first + shards - 1}, but {count} are visible "
                        f"(CUDA_VISIBLE_DEVICES={visible}); use at most {max(count - first, 0)} "
                        "shards or a machine with more GPUs")


class TorchNcclComm:
    """all_reduce of workspace buffers through torch.distributed (NCCL) on the current stream."""

    def __init__(self, engine, device_index: int) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.device = torch.device("cuda", device_index)
        self.workspace = torch.from_dlpack(engine.workspace)
        self.base = self.workspace.data_ptr()

    def view(self, pointer: int, count: int, dtype: str):
        torch_dtype = getattr(self.torch, dtype)
        nbytes = count * torch_dtype.itemsize
        offset = pointer - self.base
        if offset < 0 or offset + nbytes > self.workspace.numel():
            raise RuntimeError(f"[{STAGE}] all_reduce buffer at {pointer:#x} is outside the "
                               "engine's workspace")
        return self.workspace[offset:offset + nbytes].view(torch_dtype)

    def all_reduce(self, src: int, dst: int, count: int, dtype: str) -> None:
        target = self.view(dst, count, dtype)
        if src != dst:
            target.copy_(self.view(src, count, dtype))
        self.dist.all_reduce(target)


def _serve(rank: int, shards: int, port: int, first: int, lib: str, params: Any,
           chat_config: dict | None, cudagraph: bool | None, conn) -> None:
    """A worker: join the group, open rank `rank`'s engine, run the parent's calls."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    try:
        import torch
        import torch.distributed as dist

        from mlcc.runtime_check.compiled import CompiledEngine

        torch.cuda.set_device(first + rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=shards)
        engine = CompiledEngine(lib, params, chat_config, f"cuda:{first + rank}", cudagraph,
                                tensor_parallel_rank=rank)
        _PROCESS_COMM.append(TorchNcclComm(engine, first + rank))
        register_collectives()
        warm = torch.ones(1, device=f"cuda:{first + rank}")
        dist.all_reduce(warm)  # the NCCL communicator exists before any graph capture
        torch.cuda.synchronize()
        conn.send(("ready", engine.load_seconds))
    except BaseException as err:  # the parent reports it
        conn.send(("error", f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}"))
        return
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            method, args = message
            try:
                result = getattr(engine, method)(*args)
                conn.send(("ok", result if rank == 0 else None))
            except Exception as err:  # the engine's own one-line errors included
                conn.send(("error", f"rank {rank}: {err}"))
    finally:
        dist.destroy_process_group()


class ProcessRanks:
    """N worker processes, one per GPU, that run every call together."""

    def __init__(self, lib_path: Path, params: str | Path | Mapping[str, np.ndarray],
                 chat_config: dict | None, device: str, shards: int,
                 cudagraph: bool | None) -> None:
        first = _first_gpu(device)
        check_cuda_group(shards, first)
        if isinstance(params, Mapping):
            raise MlccError(STAGE, "tensor-parallel CUDA workers read the weights themselves: "
                            "pass the params folder, not arrays")
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the workers
        context = multiprocessing.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        for rank in range(shards):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, name=f"mlcc-rank{rank}", daemon=True,
                                   args=(rank, shards, port, first, str(lib_path), str(params),
                                         chat_config, cudagraph, child))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        start = time.perf_counter()
        self.load_seconds = max(self._receive(r, START_TIMEOUT_S) for r in range(shards))
        self.start_seconds = time.perf_counter() - start

    def _receive(self, rank: int, timeout: float) -> Any:
        conn, proc = self.conns[rank], self.procs[rank]
        deadline = time.monotonic() + timeout
        while not conn.poll(1.0):
            if not proc.is_alive():
                self.close()
                raise MlccError(STAGE, f"tensor-parallel rank {rank} exited with code "
                                f"{proc.exitcode} before answering")
            if time.monotonic() > deadline:
                self.close()
                raise MlccError(STAGE, f"tensor-parallel rank {rank} did not answer in "
                                f"{timeout:.0f} s (raise MLCC_TP_CALL_TIMEOUT for slow loads)")
        status, value = conn.recv()
        if status == "error":
            raise MlccError(STAGE, f"tensor-parallel {value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        for conn in self.conns:
            conn.send((method, args))
        results = []
        errors = []
        for rank in range(len(self.conns)):
            try:
                results.append(self._receive(rank, CALL_TIMEOUT_S))
            except MlccError as err:
                errors.append(err)
        if errors:
            raise errors[0]
        return results[0]

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
