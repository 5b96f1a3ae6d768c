"""Ranks of a sharded library in worker processes: one per GPU, summing through NCCL.

Each worker binds GPU `first + rank`, joins a torch.distributed NCCL group of all ranks, opens
the library as `CompiledEngine(..., tensor_parallel_rank=rank)` and serves calls from the parent
over a pipe. "mlcc.ccl.all_reduce" in a worker is `dist.all_reduce` on a torch view of the
engine's workspace, issued on the current stream: in a plain call that is the stream TVM runs on,
and while the decode step is captured it is the capture stream, so the all_reduce becomes a node
of the CUDA graph and a replay runs no Python.

The same workers run CPU libraries with torch.distributed's gloo backend, which checks this
machinery (start, calls, errors, shutdown) on a machine without GPUs. Workers start with the
"spawn" method (CUDA cannot be used across fork) and NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

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
ERROR_GRACE_S = 10.0  # how long the other ranks may take to answer once one has failed


def _first_gpu(device: str) -> int | None:
    """The first GPU of the ranks, or None for CPU ranks."""
    if device in ("cpu", "llvm"):
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise MlccError(STAGE, f"device {device!r}: tensor-parallel workers run on cpu, cuda or "
                    "cuda:N (the first of the GPUs used)")


def check_group(shards: int, first: int | None) -> None:
    """torch.distributed (with NCCL on GPUs) is there and enough GPUs are visible."""
    where = "on the CPU" if first is None else "on CUDA"
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise MlccError(STAGE, f"tensor_parallel_shards={shards} {where} needs torch with "
                        f"torch.distributed ({err}); install torch (the CUDA build for GPUs)"
                        ) from None
    if not dist.is_available() or (first is not None and not dist.is_nccl_available()):
        raise MlccError(STAGE, f"tensor_parallel_shards={shards} {where} needs "
                        f"torch.distributed{'' if first is None else ' with NCCL'}, which this "
                        f"torch ({torch.__version__}) lacks; install the CUDA build of torch")
    if first is None:
        return
    count = torch.cuda.device_count()
    if first + shards > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        raise MlccError(STAGE, f"tensor_parallel_shards={shards} starting at cuda:{first} needs "
                        f"GPUs {first}..{first + shards - 1}, but {count} are visible "
                        f"(CUDA_VISIBLE_DEVICES={visible}); use at most {max(count - first, 0)} "
                        "shards or a machine with more GPUs")


class TorchComm:
    """all_reduce of workspace buffers through torch.distributed, on the current stream."""

    def __init__(self, engine) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
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


def _join(rank: int, shards: int, port: int, first: int | None):
    """Join the group as `rank`; returns (torch.distributed, this rank's device name)."""
    import torch
    import torch.distributed as dist

    if first is not None:
        torch.cuda.set_device(first + rank)
    dist.init_process_group("gloo" if first is None else "nccl",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=shards)
    return dist, "cpu" if first is None else f"cuda:{first + rank}"


def _serve(rank: int, shards: int, port: int, first: int | None, lib: str, params: Any,
           chat_config: dict | None, cudagraph: bool | None, conn) -> None:
    """A worker: join the group, open rank `rank`'s engine, run the parent's calls."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    dist = None
    try:
        import torch

        from mlcc.runtime_check.compiled import CompiledEngine

        dist, device = _join(rank, shards, port, first)
        engine = CompiledEngine(lib, params, chat_config, device, cudagraph,
                                tensor_parallel_rank=rank)
        _PROCESS_COMM.append(TorchComm(engine))
        register_collectives()
        warm = torch.ones(1, device=device)
        dist.all_reduce(warm)  # the communicator exists before any graph capture
        if first is not None:
            torch.cuda.synchronize()
        conn.send(("ready", engine.load_seconds))
    except BaseException as err:  # the parent reports it
        conn.send(("error", f"rank {rank}: {type(err).__name__}: {err}\n"
                            f"{traceback.format_exc()}"))
        _leave(dist, conn)
    try:
        _loop(engine, rank, conn)
    finally:
        _leave(dist, conn)


def _loop(engine, rank: int, conn) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        method, args = message
        try:
            result = getattr(engine, method)(*args)
            conn.send(("ok", result if rank == 0 else None))
        except Exception as err:  # the engine's own one-line errors included
            conn.send(("error", f"rank {rank}: {getattr(err, 'message', err)}"))


def _leave(dist, conn) -> None:
    """Leave the group, then wait until every rank has: rank 0 hosts the group's store, and a
    rank whose store is gone spends its last seconds retrying it."""
    try:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    try:
        conn.send(("closed", None))
        conn.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)  # skip interpreter teardown: nothing is left to flush or release


class ProcessRanks:
    """N worker processes, one per GPU, that run every call together."""

    def __init__(self, lib_path: Path, params: str | Path | Mapping[str, np.ndarray],
                 chat_config: dict | None, device: str, shards: int,
                 cudagraph: bool | None) -> None:
        first = _first_gpu(device)
        check_group(shards, first)
        if isinstance(params, Mapping):
            raise MlccError(STAGE, "tensor-parallel workers read the weights themselves: "
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
                self.close(force=True)
                raise MlccError(STAGE, f"tensor-parallel rank {rank} exited with code "
                                f"{proc.exitcode} before answering")
            if time.monotonic() > deadline:
                self.close(force=True)
                raise MlccError(STAGE, f"tensor-parallel rank {rank} did not start in "
                                f"{timeout:.0f} s (MLCC_TP_START_TIMEOUT)")
        status, value = conn.recv()
        if status == "error":
            self.close(force=True)
            raise MlccError(STAGE, f"tensor-parallel {value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        for conn in self.conns:
            conn.send((method, args))
        results: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while len(results) < len(self.conns):
            pending = [c for r, c in enumerate(self.conns) if r not in results]
            for conn in wait(pending, timeout=5.0):
                results[self.conns.index(conn)] = conn.recv()
            errors = [results[r][1] for r in sorted(results) if results[r][0] == "error"]
            if errors and len(results) < len(self.conns):
                # The others either fail alike or wait for the failed rank in a collective.
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            dead = [r for r, p in enumerate(self.procs) if r not in results and not p.is_alive()]
            if dead or (len(results) < len(self.conns) and time.monotonic() > deadline):
                self.close(force=True)
                why = (errors[0] if errors else
                       f"rank {dead[0]} exited with code {self.procs[dead[0]].exitcode}" if dead
                       else f"no answer in {CALL_TIMEOUT_S:.0f} s (MLCC_TP_CALL_TIMEOUT)")
                raise MlccError(STAGE, f"tensor-parallel {method}: {why}; the workers are "
                                "stopped")
        errors = [results[r][1] for r in sorted(results) if results[r][0] == "error"]
        if errors:  # every rank answered: they are still in step
            raise MlccError(STAGE, f"tensor-parallel {errors[0]}")
        return results[0][1]

    def close(self, force: bool = False) -> None:
        """Stop the workers: each leaves the NCCL group, rank 0 last (it hosts the group's
        store, which the others' NCCL watchdogs poll until they leave), then all exit
        together."""
        alive = [r for r, p in enumerate(self.procs) if p.is_alive()]
        if not force:
            for leaving in ([r for r in alive if r != 0], [r for r in alive if r == 0]):
                for r in leaving:
                    _quietly(self.conns[r].send, None)
                for r in leaving:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and self.conns[r].poll(1.0):
                        if _quietly(self.conns[r].recv) in (("closed", None), None):
                            break
            for r in alive:
                _quietly(self.conns[r].send, "exit")
        for proc in self.procs:
            proc.join(timeout=0 if force else 10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)


def _quietly(fn, *args):
    try:
        return fn(*args)
    except (EOFError, OSError):
        return None
