"""The README's main job, command by command, on the bundled real model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
REFERENCE = json.loads((MODEL / "reference.json").read_text())


def mlcc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mlcc.cli", *args], capture_output=True,
                         text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("main_job")
    params, lib = root / "params", root / "lib.so"
    mlcc("convert_weight", str(MODEL), "--quantization", "q0f32", "-o", str(params))
    mlcc("gen_config", str(MODEL), "--quantization", "q0f32", "--conv-template", "LM",
         "-o", str(params))
    dump = root / "dump"
    out = mlcc("compile", str(params / "mlc-chat-config.json"), "--device", "cpu", "-o", str(lib),
               "--debug-dump", str(dump))
    assert "memory: params" in out.stderr and "wrote" in out.stderr
    assert (dump / "00-input.txt").is_file() and any(dump.glob("*plan_memory.txt"))
    return params, lib


def test_chat_prompt_reproduces_reference_story(built):
    params, lib = built
    case = REFERENCE["cases"][0]
    out = mlcc("chat", str(params), "--model-lib-path", str(lib), "--prompt", case["prompt"],
               "--temperature", "0")
    # The LM template feeds BOS + the prompt, exactly the reference's prompt ids; greedy decoding
    # then writes the reference continuation (until the reply's length limit or a stop).
    reply = out.stdout
    assert len(reply) > len(case["continuation_text"])
    assert reply.startswith(case["continuation_text"])


def test_bench_prints_throughput(built):
    params, lib = built
    out = mlcc("bench", str(params), "--model-lib-path", str(lib), "--prompt", "Lily went to",
               "--generate-length", "32")
    assert re.search(r"prefill: [\d.,]+ tok/s, decode: [\d.,]+ tok/s", out.stdout + out.stderr)


def test_compile_refuses_unknown_device_and_bad_suffix(built, tmp_path):
    params, _ = built
    out = mlcc("compile", str(params), "--device", "metal", "-o", str(tmp_path / "x.so"),
               check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 2  # echo line + one error line
    assert "error: [compile] --device metal" in out.stderr
    out = mlcc("compile", str(params), "-o", str(tmp_path / "x.zip"), check=False)
    assert out.returncode == 1 and "suffix chooses the artifact" in out.stderr
    assert not any(tmp_path.iterdir())
