"""convert_weight on a ~120 MB, 4-shard checkpoint: peak memory near two shards, clean SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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
    figures = ", ".join(f"{key} {value / 1e6:.1f} MB" for key, value in result.items()
                        if key.endswith("bytes"))
    message = f"added {added / 1e6:.1f} MB; {figures}"
    assert added <= 2 * result["largest_shard_bytes"] + 50e6, message
    assert added < result["checkpoint_bytes"], message
    assert not any(tmp_path.iterdir())  # the benchmark cleans up after itself


@pytest.mark.slow
def test_sigterm_during_conversion_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "hf"
    subprocess.run([sys.executable, str(BENCHMARK), "--build", str(source), "--shape", "100mb"],
                   check=True, timeout=600)
    out_root = tmp_path / "out"
    out_root.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "mlcc.cli", "convert_weight", str(source), "--quantization",
         "q4f16_1", "-o", str(out_root / "params")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Wait until the first shard has bytes in the staging folder, then stop the run.
    while not any(p.stat().st_size for p in out_root.glob(".params.*.partial/*.bin")):
        assert child.poll() is None and time.monotonic() < deadline, "conversion never started"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert (child.returncode, stderr.strip()) == (130, "error: interrupted")
    assert not any(out_root.iterdir())
