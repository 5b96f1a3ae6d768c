"""Load a model library with the TVM runtime alone, read its metadata and call its entries.

Nothing here imports the TVM compiler or mlcc.backends. To be sure that only libtvm_runtime is
used, set `TVM_USE_RUNTIME_LIB=1` before the first `import tvm` of the process.

    lib = load_library("out/lib.so")            # ModelLibrary
    lib.metadata                                # dict (see mlcc.backends.build)
    lib.call("decode", *arrays)                 # numpy arrays or TVM tensors, in entry order
    session = lib.session(params)               # allocates what entry signatures ask for
    logits = session.run("prefill", [1, 403, 407])   # returns the entry's logits (numpy)

`session` works for entries built with `EntryBuilder`, whose signatures name each argument's
role: tokens (the ids of this call), seq_info (int32, element 0 = tokens already cached),
page_table (int32, page i of the sequence; filled 0, 1, 2, ...), kv_cache (zeroed once),
param (from `params`, checked by name, shape and dtype), logits / output (returned), workspace
(one buffer, as large as the largest entry needs), scalar (seq_start as an int).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlcc.errors import MlccError

STAGE = "runtime"
METADATA_SIZE_FUNC = "mlcc_metadata_nbytes"
METADATA_FUNC = "mlcc_metadata"


def runtime_only() -> bool:
    """Whether this process loaded TVM without its compiler (TVM_USE_RUNTIME_LIB=1)."""
    import tvm

    return bool(getattr(tvm.base, "_RUNTIME_ONLY", False))


def read_metadata(module) -> dict[str, Any]:
    """The metadata JSON embedded by build_library, from a loaded runtime module."""
    try:
        nbytes = int(module[METADATA_SIZE_FUNC]())
        buffer = _to_tensor(np.zeros(nbytes, np.uint8))
        module[METADATA_FUNC](buffer)
        out = buffer.numpy()
    except (AttributeError, RuntimeError, ValueError) as err:
        raise MlccError(STAGE, f"the library has no mlcc metadata ({err}); build it with "
                        "`mlcc compile` or mlcc.backends.build.build_library") from None
    return json.loads(out.tobytes().decode("ascii"))


def _to_tensor(array, device=None):
    """A TVM tensor holding `array`: TVM tensors pass through, anything else is copied into a
    fresh (64-byte aligned) tensor, because kernels assume aligned data."""
    import tvm

    if isinstance(array, tvm.runtime.Tensor):
        return array
    return tvm.runtime.tensor(np.ascontiguousarray(array), device or tvm.cpu(0))


class ModelLibrary:
    """A loaded model library: its metadata and its entry functions."""

    def __init__(self, path: Path, module, device) -> None:
        self.path = path
        self.module = module
        self.device = device
        self.metadata = read_metadata(module)

    @property
    def entry_names(self) -> list[str]:
        return list(self.metadata.get("entries", {}))

    def signature(self, entry: str) -> dict[str, Any]:
        entries = self.metadata.get("entries", {})
        if entry not in entries:
            raise MlccError(STAGE, f"{self.path.name} has no entry {entry!r}; it has "
                            f"{', '.join(entries) or 'none'}")
        return entries[entry]

    def function(self, entry: str):
        self.signature(entry)
        return self.module[entry]

    def call(self, entry: str, *args) -> None:
        """Call an entry with arrays (copied to aligned tensors) or TVM tensors, in order."""
        expected = self.signature(entry).get("args")
        if expected is not None and len(expected) != len(args):
            names = ", ".join(a["name"] for a in expected)
            raise MlccError(STAGE, f"entry {entry} takes {len(expected)} arguments ({names}), "
                            f"got {len(args)}")
        values = [a if isinstance(a, (int, float)) else _to_tensor(a, self.device) for a in args]
        self.module[entry](*values)

    def session(self, params: Mapping[str, np.ndarray]) -> Session:
        return Session(self, params)


def load_library(path: str | Path, device: str = "cpu") -> ModelLibrary:
    """Load `path` (.so, or .tar which the runtime relinks with the host compiler)."""
    import tvm

    path = Path(path)
    if not path.is_file():
        raise MlccError(STAGE, f"model library {path} does not exist; build it first")
    if device not in ("cpu", "llvm"):
        raise MlccError(STAGE, f"device {device!r}: this runtime runs CPU libraries; use cpu")
    return ModelLibrary(path, tvm.runtime.load_module(str(path)), tvm.cpu(0))


class Session:
    """One sequence: the state every entry shares, allocated once from the signatures."""

    def __init__(self, library: ModelLibrary, params: Mapping[str, np.ndarray]) -> None:
        import tvm

        self.library = library
        self.length = 0
        self.state: dict[str, Any] = {}
        workspace = max((s.get("workspace_bytes", 0) for s in self._signatures()), default=0)
        self.state["workspace"] = tvm.runtime.empty((max(workspace, 64),), "uint8",
                                                    library.device)
        for sig in self._signatures():
            for arg in sig.get("args", []):
                self._prepare(arg, params)

    def _signatures(self) -> list[dict[str, Any]]:
        return [s for s in self.library.metadata.get("entries", {}).values() if "args" in s]

    def _prepare(self, arg: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> None:
        import tvm

        name, role, dtype = arg["name"], arg["role"], arg["dtype"]
        if name in self.state or role in ("tokens", "workspace", "scalar", "input"):
            return
        if any(isinstance(d, str) for d in arg["shape"]) and role != "param":
            raise MlccError(STAGE, f"argument {name} ({role}) has symbolic shape {arg['shape']}; "
                            "only tokens and the workspace may vary per call")
        device = self.library.device
        if role == "param":
            self.state[name] = _to_tensor(_checked_param(arg, params), device)
        elif role == "page_table":
            self.state[name] = _to_tensor(np.arange(arg["shape"][0], dtype=dtype), device)
        elif role == "kv_cache":
            self.state[name] = _to_tensor(np.zeros(arg["shape"], dtype), device)
        else:  # seq_info, logits, output: written per call
            self.state[name] = tvm.runtime.empty(tuple(arg["shape"]), dtype, device)

    def reset(self) -> None:
        self.length = 0

    def run(self, entry: str, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` through `entry`; returns its logits (or output) as numpy."""
        sig = self.library.signature(entry)
        if "args" not in sig:
            raise MlccError(STAGE, f"entry {entry} of {self.library.path.name} carries no "
                            "argument roles (it was not built with EntryBuilder); call it with "
                            "ModelLibrary.call or run the library with CompiledEngine")
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1)
        values, result = [], None
        for arg in sig["args"]:
            role = arg["role"]
            if role == "tokens":
                values.append(_to_tensor(ids, self.library.device))
            elif role == "scalar":
                values.append(self.length)
            elif role == "workspace":
                values.append(self.state["workspace"])
            else:
                value = self.state[arg["name"]]
                if role == "seq_info":
                    info = np.zeros(arg["shape"], np.int32)
                    info.reshape(-1)[0] = self.length
                    value.copyfrom(info)
                if role in ("logits", "output"):
                    result = value
                values.append(value)
        self.library.module[entry](*values)
        self.length += int(ids.size)
        return result.numpy() if result is not None else np.zeros(0, np.float32)


def _checked_param(arg: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> np.ndarray:
    name = arg["name"]
    if name not in params:
        raise MlccError(STAGE, f"parameter {name} ({arg['dtype']}{arg['shape']}) is missing "
                        "from the weights; they do not match this library")
    value = np.asarray(params[name])
    if list(value.shape) != list(arg["shape"]) or str(value.dtype) != arg["dtype"]:
        raise MlccError(STAGE, f"parameter {name}: the library expects {arg['dtype']}"
                        f"{arg['shape']}, the weights have {value.dtype}{list(value.shape)}")
    return value
