"""Bad inputs to `mlcc convert_weight`: exit 1, one `error: [stage] ...` line, nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from mlcc.cli import app

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
STORIES_PT = SHARED / "models" / "stories260K-pytorch"

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


def fails_cleanly(workdir: Path, *args: object) -> str:
    """Run the command, check the failure contract, return the message after `error: `."""
    before = sorted(p.name for p in workdir.iterdir())
    result = CliRunner().invoke(app, ["convert_weight", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ["), result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == before  # no output, no staging folder
    return lines[0].removeprefix("error: ")


def model_copy(tmp_path: Path, edit=None, name: str = "model") -> Path:
    """stories260K's config and safetensors in tmp_path/name, with `edit(tensors)` applied."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    tensors = load_file(STORIES / "model.safetensors")
    if edit is not None:
        edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_missing_config(tmp_path: Path, work: Path) -> None:
    msg = fails_cleanly(work, tmp_path / "no-such-model", "--quantization", "q4f16_1",
                        "-o", work / "out")
    assert msg.startswith("[config] ") and "no such folder or file, and not a preset" in msg


def test_unknown_quantization(work: Path) -> None:
    msg = fails_cleanly(work, STORIES, "--quantization", "q5f16_1", "-o", work / "out")
    assert msg.startswith("[quantization] unknown quantization 'q5f16_1'; known: q0f16")


def test_unknown_model_type(work: Path) -> None:
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_1", "--model-type", "rwkv",
                        "-o", work / "out")
    assert msg.startswith("[config] model_type 'rwkv' is not supported; known: ")


def test_corrupt_safetensors(tmp_path: Path, work: Path) -> None:
    folder = model_copy(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64 + b"not a safetensors file")
    msg = fails_cleanly(work, folder, "--quantization", "q4f16_1", "-o", work / "out")
    assert msg.startswith("[convert_weight] model.safetensors: cannot read this safetensors file")


def test_truncated_safetensors(tmp_path: Path, work: Path) -> None:
    folder = model_copy(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = fails_cleanly(work, folder, "--quantization", "q4f16_1", "-o", work / "out")
    assert msg.startswith("[convert_weight] model.safetensors: ") and "truncated" in msg


def test_truncated_pytorch_bin(tmp_path: Path, work: Path) -> None:
    folder = tmp_path / "pt"
    folder.mkdir()
    shutil.copy(STORIES_PT / "config.json", folder)
    data = (STORIES_PT / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    msg = fails_cleanly(work, folder, "--quantization", "q4f16_1", "-o", work / "out")
    assert msg.startswith("[convert_weight] pytorch_model.bin: cannot read this PyTorch file")


def test_missing_tensor(tmp_path: Path, work: Path) -> None:
    folder = model_copy(tmp_path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    msg = fails_cleanly(work, folder, "--quantization", "q4f16_1", "-o", work / "out")
    assert msg.startswith("[convert_weight] model.layers.2.mlp.up_proj.weight: missing from "
                          "the checkpoint (expected shape (172, 64)")


def test_wrong_shape(tmp_path: Path, work: Path) -> None:
    def shrink(t: dict) -> None:
        t["model.layers.3.mlp.down_proj.weight"] = t["model.layers.3.mlp.down_proj.weight"][:, :170]

    folder = model_copy(tmp_path, shrink)
    msg = fails_cleanly(work, folder, "--quantization", "q4f16_1", "-o", work / "out")
    assert msg == ("[convert_weight] model.layers.3.mlp.down_proj.weight: expected (64, 172), "
                   "got (64, 170) in model.safetensors")


def test_nan_in_the_last_parameter_after_shards_were_written(tmp_path: Path, work: Path) -> None:
    def poison(t: dict) -> None:
        t["model.norm.weight"] = t["model.norm.weight"].copy()
        t["model.norm.weight"][5] = np.nan

    folder = model_copy(tmp_path, poison)
    msg = fails_cleanly(work, folder, "--quantization", "q0f32", "-o", work / "a" / "b" / "out")
    assert msg.startswith("[convert_weight] model.norm.weight: 1 NaN/inf value(s), first at "
                          "index (5,) (from model.norm.weight)")


def test_inf_in_a_quantized_weight(tmp_path: Path, work: Path) -> None:
    def poison(t: dict) -> None:
        t["model.layers.1.self_attn.k_proj.weight"] = t[
            "model.layers.1.self_attn.k_proj.weight"].copy()
        t["model.layers.1.self_attn.k_proj.weight"][3, 7] = -np.inf

    folder = model_copy(tmp_path, poison)
    msg = fails_cleanly(work, folder, "--quantization", "q4f16_1", "-o", work / "out")
    # k_proj rows follow the 64 q_proj rows inside the fused qkv_proj.
    assert msg.startswith("[convert_weight] model.layers.1.self_attn.qkv_proj.weight: 1 NaN/inf "
                          "value(s), first at index (67, 7)")


def test_output_is_a_file(work: Path) -> None:
    target = work / "params"
    target.write_text("not a folder")
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_1", "-o", target)
    assert msg.endswith("params: exists and is not a folder; --output must name a folder "
                        "(new or empty)")
    assert target.read_text() == "not a folder"


def test_output_below_a_file(work: Path) -> None:
    (work / "file").write_text("x")
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_1", "-o", work / "file" / "out")
    assert msg.startswith("[convert_weight] ") and "file is a file" in msg


def test_non_empty_output_without_overwrite_is_untouched(work: Path) -> None:
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("keep")
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_1", "-o", work / "out")
    assert "folder is not empty; pass --overwrite" in msg
    assert [p.name for p in (work / "out").iterdir()] == ["notes.txt"]


def test_awq_mode_on_a_float_checkpoint(work: Path) -> None:
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_awq", "-o", work / "out")
    assert msg.startswith(f"[convert_weight] {STORIES}: --quantization q4f16_awq needs an "
                          "AutoAWQ checkpoint")


def test_unknown_device(work: Path) -> None:
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_1", "--device", "tpu",
                        "-o", work / "out")
    assert msg.startswith("[convert_weight] --device 'tpu' is not supported")


def _without_dac_override() -> list[str] | None:
    """A command prefix that makes root obey file permissions, or None when none is possible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    probe = subprocess.run([*prefix, "true"], check=False, capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_no_write_permission(work: Path) -> None:
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("running as root without a way to drop CAP_DAC_OVERRIDE: root ignores "
                    "folder permissions")
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "mlcc.cli", "convert_weight", str(STORIES),
             "--quantization", "q4f16_1", "-o", str(locked / "params")],
            check=False, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: [convert_weight] {locked / 'params'}: no permission "
                                   f"to write in {locked}; choose another --output or fix the "
                                   "folder's permissions")
    assert not any(locked.iterdir())


def test_interrupt_leaves_nothing(monkeypatch: pytest.MonkeyPatch, work: Path) -> None:
    from mlcc.frontend.ndarray_cache import NDArrayCacheWriter

    calls = []

    def add_then_interrupt(self, name, array):
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(self, name, array)

    original = NDArrayCacheWriter.add
    monkeypatch.setattr(NDArrayCacheWriter, "add", add_then_interrupt)
    result = CliRunner().invoke(app, ["convert_weight", str(STORIES), "--quantization",
                                      "q4f16_1", "-o", str(work / "new" / "out")])
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted"
    assert not any(work.iterdir())


def test_sigterm_turned_into_another_error_still_reads_as_interrupted(
        monkeypatch: pytest.MonkeyPatch, work: Path) -> None:
    """A library that catches the interrupt and raises its own error, with the shard's close
    then failing too: the command still ends as interrupted (130) and leaves nothing."""
    import signal

    from mlcc.frontend.ndarray_cache import NDArrayCacheWriter

    calls = []

    def add_signal_wrapped(self, name, array):
        calls.append(name)
        if len(calls) == 10:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises as soon as the signal is delivered
            except KeyboardInterrupt:
                self._file.close = failing_close
                raise RuntimeError("stream was interrupted") from None
            raise AssertionError("SIGTERM did not interrupt the conversion")
        return original(self, name, array)

    def failing_close():
        raise OSError("close of a half-written file")

    original = NDArrayCacheWriter.add
    monkeypatch.setattr(NDArrayCacheWriter, "add", add_signal_wrapped)
    previous = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["convert_weight", str(STORIES), "--quantization",
                                      "q4f16_1", "-o", str(work / "new" / "out")])
    assert (result.exit_code, result.stderr.strip()) == (130, "error: interrupted")
    assert not any(work.iterdir())
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back


def test_preset_without_source(work: Path) -> None:
    from mlcc.frontend import preset_names

    msg = fails_cleanly(work, preset_names()[0], "--quantization", "q4f16_1", "-o", work / "out")
    assert "a preset has no weights; pass --source" in msg


def test_cuda_is_refused_before_any_work_when_absent(work: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    msg = fails_cleanly(work, STORIES, "--quantization", "q4f16_1", "--device", "cuda:1",
                        "-o", work / "out")
    assert "CUDA is not available" in msg and "use --device cpu" in msg
