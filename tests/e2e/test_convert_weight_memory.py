"""convert_weight's peak memory on a ~110 MB, 4-shard checkpoint stays near two shards + 300 MB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "convert_memory.py"


@pytest.mark.slow
def test_peak_rss_of_a_100mb_conversion_is_within_two_shards_plus_300mb(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--shape", "100mb", "--json", "--workdir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checkpoint_bytes"] > 100e6 and result["largest_shard_bytes"] < 40e6
    # What the conversion adds to a process that has only imported mlcc and torch (~230 MB on
    # a CPU build of torch, more on a CUDA build): about two source shards, never the model.
    added = result["peak_rss_bytes"] - result["import_rss_bytes"]
    assert added <= 2 * result["largest_shard_bytes"] + 50e6, result
    assert added < result["checkpoint_bytes"], result
    assert not any(tmp_path.iterdir())  # the benchmark cleans up after itself
