"""MLC LLM's weight format: `ndarray-cache.json` plus `params_shard_K.bin`, written and read.

    {"metadata": {"ParamSize": tensors, "ParamBytes": bytes, "BitsPerParam": bytes * 8 / weights},
     "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": ...,
                  "md5sum": ..., "records": [{"name", "shape", "dtype", "format": "raw",
                                              "nbytes", "byteOffset"}, ...]}, ...]}

Shards hold whole tensors back to back as raw little-endian bytes; a shard is closed before a
tensor would push it past `shard_bytes` (a tensor larger than that gets a shard of its own).
As in MLC LLM, ParamSize counts stored tensors and BitsPerParam divides the stored bits by the
number of weights of the unquantized model. The reader also accepts MLC's "f32-to-bf16" records
(bfloat16 bytes that load as float32).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlcc.errors import MlccError

INDEX_FILE = "ndarray-cache.json"
SHARD_PATTERN = "params_shard_*.bin"
DEFAULT_SHARD_BYTES = 32 * 1024 * 1024

_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "uint32", "int64")


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"params_shard_{index}.bin"


class NDArrayCacheWriter:
    """Streams tensors into shards as they come; only the open shard's file handle is kept."""

    def __init__(self, out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self._shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._md5 = hashlib.md5()
        self._names: set[str] = set()
        self._elements = 0

    def add(self, name: str, array: np.ndarray) -> None:
        """Append one tensor; it goes to the open shard unless that would exceed shard_bytes."""
        if name in self._names:
            raise MlccError("convert_weight", f"{name}: written twice to {self.out_dir}")
        dtype = np.dtype(array.dtype).name
        if dtype not in _DTYPES:
            raise MlccError("convert_weight", f"{name}: dtype {dtype} cannot be stored; "
                            f"supported: {', '.join(_DTYPES)}")
        data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
        nbytes = data.nbytes
        if self._file is None or (self._shards[-1]["nbytes"] + nbytes > self.shard_bytes
                                  and self._shards[-1]["records"]):
            self._open_shard()
        shard = self._shards[-1]
        shard["records"].append({"name": name, "shape": list(data.shape), "dtype": dtype,
                                 "format": "raw", "nbytes": nbytes, "byteOffset": shard["nbytes"]})
        view = memoryview(data.reshape(-1).view(np.uint8))
        self._file.write(view)
        self._md5.update(view)
        shard["nbytes"] += nbytes
        self._names.add(name)
        self._elements += data.size

    def finish(self, num_weights: int | None = None) -> dict:
        """Close the last shard and write ndarray-cache.json; returns a summary.

        `num_weights` is the element count of the unquantized model (for BitsPerParam); it
        defaults to the number of stored elements.
        """
        self._close_shard()
        total = sum(shard["nbytes"] for shard in self._shards)
        weights = num_weights if num_weights else max(self._elements, 1)
        metadata = {"ParamSize": len(self._names), "ParamBytes": total,
                    "BitsPerParam": total * 8 / weights}
        index = {"metadata": metadata, "records": self._shards}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return {"tensors": len(self._names), "bytes": total, "shards": len(self._shards),
                "weights": weights, "bits_per_param": metadata["BitsPerParam"]}

    def _open_shard(self) -> None:
        self._close_shard()
        path = shard_name(len(self._shards))
        self._shards.append({"dataPath": path, "format": "raw-shard", "nbytes": 0,
                             "md5sum": "", "records": []})
        self._file = open(self.out_dir / path, "wb")  # noqa: SIM115 - closed in _close_shard
        self._md5 = hashlib.md5()

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._shards[-1]["md5sum"] = self._md5.hexdigest()

    def abort(self) -> None:
        """Close the open shard without writing the index (the caller removes the folder).

        Runs while another error unwinds: a close that fails (the file's last write was cut
        short) must not replace that error.
        """
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._file.close()
            self._file = None


def read_ndarray_cache_index(params_dir: str | Path) -> dict:
    """The parsed ndarray-cache.json of `params_dir`, with its structure checked."""
    path = Path(params_dir) / INDEX_FILE
    if not path.is_file():
        raise MlccError("load", f"{path}: not found; run `mlcc convert_weight` to create the "
                        "weights folder")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MlccError("load", f"{path}: invalid JSON ({err}); convert the weights again") from None
    if not isinstance(index, dict) or not isinstance(index.get("records"), list):
        raise MlccError("load", f"{path}: expected an object with a 'records' list; convert the "
                        "weights again")
    for shard in index["records"]:
        _check_shard_record(shard, path)
    return index


def _check_shard_record(shard: dict, index_path: Path) -> None:
    keys = ("dataPath", "format", "nbytes", "records")
    missing = [key for key in keys if key not in shard]
    if missing:
        raise MlccError("load", f"{index_path}: shard record lacks {', '.join(missing)}")
    end = 0
    for rec in shard["records"]:
        absent = [key for key in ("name", "shape", "dtype", "format", "nbytes", "byteOffset")
                  if key not in rec]
        if absent:
            raise MlccError("load", f"{index_path}: record {rec.get('name', '?')} in "
                            f"{shard['dataPath']} lacks {', '.join(absent)}")
        end = max(end, rec["byteOffset"] + rec["nbytes"])
    if end > shard["nbytes"]:
        raise MlccError("load", f"{index_path}: {shard['dataPath']} records end at byte {end} "
                        f"but the shard has nbytes {shard['nbytes']}")


def load_ndarray_cache(params_dir: str | Path, verify_md5: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a weights folder as NumPy arrays (bfloat16 records load as float32)."""
    params_dir = Path(params_dir)
    arrays: dict[str, np.ndarray] = {}
    for shard in read_ndarray_cache_index(params_dir)["records"]:
        data = _read_shard(params_dir, shard, verify_md5)
        for rec in shard["records"]:
            arrays[rec["name"]] = _decode_record(rec, data, shard["dataPath"])
    return arrays


def _read_shard(params_dir: Path, shard: dict, verify_md5: bool) -> bytes:
    path = params_dir / shard["dataPath"]
    if not path.is_file():
        raise MlccError("load", f"{path}: shard listed in {INDEX_FILE} is missing; convert the "
                        "weights again")
    data = path.read_bytes()
    if len(data) != shard["nbytes"]:
        raise MlccError("load", f"{path}: expected {shard['nbytes']} bytes, found {len(data)} "
                        "(truncated or replaced); convert the weights again")
    if verify_md5 and shard.get("md5sum") and hashlib.md5(data).hexdigest() != shard["md5sum"]:
        raise MlccError("load", f"{path}: md5 {hashlib.md5(data).hexdigest()} differs from "
                        f"{shard['md5sum']} in {INDEX_FILE} (corrupt); convert the weights again")
    return data


def _decode_record(rec: dict, data: bytes, data_path: str) -> np.ndarray:
    shape = tuple(rec["shape"])
    start, nbytes = rec["byteOffset"], rec["nbytes"]
    raw = data[start:start + nbytes]
    if rec["format"] == "f32-to-bf16":
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    if rec["format"] != "raw" or rec["dtype"] not in _DTYPES:
        raise MlccError("load", f"{rec['name']} in {data_path}: unsupported format "
                        f"{rec['format']!r} / dtype {rec['dtype']!r}")
    expected = math.prod(shape) * np.dtype(rec["dtype"]).itemsize
    if expected != nbytes:
        raise MlccError("load", f"{rec['name']} in {data_path}: shape {list(shape)} of "
                        f"{rec['dtype']} needs {expected} bytes, record says {nbytes}")
    return np.frombuffer(raw, dtype=np.dtype(rec["dtype"]).newbyteorder("<")).reshape(shape).copy()
