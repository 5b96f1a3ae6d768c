"""ndarray-cache.json + params_shard_K.bin: schema, offsets, md5 sums, sharding and round trips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mlcc.errors import MlccError
from mlcc.frontend.ndarray_cache import (
    NDArrayCacheWriter,
    load_ndarray_cache,
    read_ndarray_cache_index,
)


def _write(out: Path, arrays: dict[str, np.ndarray], shard_bytes: int, **finish) -> dict:
    writer = NDArrayCacheWriter(out, shard_bytes=shard_bytes)
    for name, arr in arrays.items():
        writer.add(name, arr)
    return writer.finish(**finish)


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.q_weight": rng.integers(0, 2**32, size=(40, 7), dtype=np.uint32),  # 1120 B
        "a.q_scale": rng.standard_normal((40, 2)).astype(np.float16),  # 160 B
        "norm.weight": rng.standard_normal(64).astype(np.float32),  # 256 B
        "big": rng.standard_normal((30, 50)).astype(np.float32),  # 6000 B > shard size
        "ids": np.arange(5, dtype=np.int32),
    }


def test_round_trip_and_schema(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    summary = _write(tmp_path, arrays, shard_bytes=1500, num_weights=4000)
    loaded = load_ndarray_cache(tmp_path)
    assert list(loaded) == list(arrays)
    for name, arr in arrays.items():
        assert loaded[name].dtype == arr.dtype and loaded[name].shape == arr.shape
        assert loaded[name].tobytes() == arr.tobytes()

    index = json.loads((tmp_path / "ndarray-cache.json").read_text())
    total = sum(a.nbytes for a in arrays.values())
    assert index["metadata"] == {"ParamSize": 5, "ParamBytes": total,
                                 "BitsPerParam": total * 8 / 4000}
    assert summary["bytes"] == total and summary["tensors"] == 5
    shards = index["records"]
    # 1120 + 160 B fit in 1500 B, 256 more would not; "big" exceeds the limit on its own, so
    # it gets a shard alone and "ids" starts the next one.
    assert [[r["name"] for r in s["records"]] for s in shards] == [
        ["a.q_weight", "a.q_scale"], ["norm.weight"], ["big"], ["ids"]]
    for k, shard in enumerate(shards):
        data = (tmp_path / shard["dataPath"]).read_bytes()
        assert shard["dataPath"] == f"params_shard_{k}.bin" and shard["format"] == "raw-shard"
        assert shard["nbytes"] == len(data)
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        offset = 0
        for rec in shard["records"]:
            assert set(rec) == {"name", "shape", "dtype", "format", "nbytes", "byteOffset"}
            assert rec["format"] == "raw" and rec["byteOffset"] == offset
            arr = arrays[rec["name"]]
            assert rec["shape"] == list(arr.shape) and rec["dtype"] == arr.dtype.name
            # raw little-endian bytes at the recorded offset
            piece = data[offset:offset + rec["nbytes"]]
            assert piece == arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            offset += rec["nbytes"]
        assert offset == shard["nbytes"]
    assert read_ndarray_cache_index(tmp_path) == index


def test_big_endian_input_is_stored_little_endian(tmp_path: Path) -> None:
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    _write(tmp_path, {"x": arr}, shard_bytes=1 << 20)
    raw = (tmp_path / "params_shard_0.bin").read_bytes()
    assert raw == np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(load_ndarray_cache(tmp_path)["x"], arr)


def test_bf16_records_load_as_float32(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    (tmp_path / "params_shard_0.bin").write_bytes(raw)
    index = {"metadata": {}, "records": [{
        "dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": len(raw),
        "md5sum": hashlib.md5(raw).hexdigest(),
        "records": [{"name": "w", "shape": [3], "dtype": "float32", "format": "f32-to-bf16",
                     "nbytes": len(raw), "byteOffset": 0}]}]}
    (tmp_path / "ndarray-cache.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(load_ndarray_cache(tmp_path)["w"], values)


def test_duplicate_name_and_unsupported_dtype_are_refused(tmp_path: Path) -> None:
    writer = NDArrayCacheWriter(tmp_path)
    writer.add("x", np.zeros(2, np.float32))
    with pytest.raises(MlccError, match=r"\[convert_weight\] x: written twice"):
        writer.add("x", np.zeros(2, np.float32))
    with pytest.raises(MlccError, match="dtype complex64 cannot be stored"):
        writer.add("y", np.zeros(2, np.complex64))
    writer.abort()


@pytest.mark.parametrize("damage,message", [
    ("truncate", "expected 1536 bytes, found 1000"),
    ("flip", "md5 .* differs"),
    ("delete", "shard listed in ndarray-cache.json is missing"),
    ("no_index", "ndarray-cache.json: not found"),
    ("bad_json", "invalid JSON"),
    ("overlong_record", "records end at byte 1540 but the shard has nbytes 1536"),
])
def test_damaged_folders_fail_with_one_line(tmp_path: Path, damage: str, message: str) -> None:
    _write(tmp_path, {"w": np.ones((24, 16), np.float32)}, shard_bytes=1 << 20)
    shard = tmp_path / "params_shard_0.bin"
    index_path = tmp_path / "ndarray-cache.json"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "flip":
        shard.write_bytes(b"\x01" + shard.read_bytes()[1:])
    elif damage == "delete":
        shard.unlink()
    elif damage == "no_index":
        index_path.unlink()
    elif damage == "bad_json":
        index_path.write_text("{not json")
    else:
        index = json.loads(index_path.read_text())
        index["records"][0]["records"][0]["byteOffset"] = 4
        index_path.write_text(json.dumps(index))
    with pytest.raises(MlccError, match=r"^\[load\] .*" + message) as err:
        load_ndarray_cache(tmp_path)
    assert "\n" not in str(err.value)
