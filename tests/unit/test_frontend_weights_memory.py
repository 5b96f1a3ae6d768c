"""Lazy loading keeps about one source shard resident: a ~320 MB checkpoint in 4 shards is read
by a fresh process whose peak resident memory must stay far below the whole checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlcc.frontend import get_architecture

pytestmark = pytest.mark.slow

HF_CONFIG = {
    "model_type": "llama", "vocab_size": 8192, "hidden_size": 1024, "num_hidden_layers": 5,
    "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 2816,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}
NUM_SHARDS = 4

# Runs in a fresh process so that the peak RSS covers only loading.
MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mlcc.frontend import iter_params, open_checkpoint, resolve_model

    def rss_kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])

    folder = Path(sys.argv[1])
    source = resolve_model(folder)
    mapping = source.arch.weight_mapping(source.config)
    checkpoint = open_checkpoint(folder)
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    base = rss_kib("VmRSS")
    total, count = 0.0, 0
    for param, tensor in iter_params(mapping, checkpoint):
        total += float(tensor.sum())  # touch every value (float32: no extra copy), then drop it
        count += tensor.numel()
        del tensor
    peak = rss_kib("VmHWM")
    print(json.dumps({"growth_bytes": (peak - base) * 1024, "sum": total, "count": count}))
""")


def write_sharded_checkpoint(folder: Path, fmt: str) -> tuple[int, float, int]:
    """Random weights in NUM_SHARDS files plus an index.

    Returns (largest shard bytes, sum of all values, number of values)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    config = get_architecture("llama").config_cls.from_hf(HF_CONFIG)
    tensors = [(hf, shape) for p in get_architecture("llama").weight_mapping(config).params
               for hf, shape in zip(p.hf_names, p.hf_shapes)]
    total_bytes = sum(4 * torch.Size(shape).numel() for _, shape in tensors)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled, checksum, count = 0, 0.0, 0
    for name, shape in tensors:
        if filled >= total_bytes * len(shards) / NUM_SHARDS:
            shards.append({})
        tensor = torch.randn(shape, generator=generator)
        checksum += float(tensor.double().sum())
        count += tensor.numel()
        shards[-1][name] = tensor
        filled += 4 * tensor.numel()
    weight_map, largest = {}, 0
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    for i, shard in enumerate(shards):
        file = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}"
        if fmt == "safetensors":
            save_file(shard, folder / file)
        else:
            torch.save(shard, folder / file)
        largest = max(largest, (folder / file).stat().st_size)
        weight_map.update({name: file for name in shard})
    (folder / f"{stem}.{suffix}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}))
    return largest, checksum, count


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_four_shards_keep_about_one_resident(tmp_path: Path, fmt: str) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak resident memory")
    folder = tmp_path / "ckpt"
    largest, checksum, count = write_sharded_checkpoint(folder, fmt)
    assert len(list(folder.glob(f"*.{'safetensors' if fmt == 'safetensors' else 'bin'}"))) == 4
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total > 300e6
    # Large blocks are mmapped so that freed memory leaves the process: the peak then counts
    # what the loader holds, not what glibc's heap keeps cached after a free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True,
                            text=True, timeout=600, check=True, env=env)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # Every value arrived once: a lost or doubled tensor would move the sum by thousands.
    assert measured["count"] == count
    assert measured["sum"] == pytest.approx(checksum, abs=0.5)
    # One shard mapped, plus the largest parameter's parts and its fused copy, with slack;
    # loading everything would need all four shards.
    assert measured["growth_bytes"] < 1.75 * largest, (measured, largest, total)
