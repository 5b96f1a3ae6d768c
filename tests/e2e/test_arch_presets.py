"""The presets of the added architectures through the CLI, without any model folder.

gen_config writes mlc-chat-config.json from a preset name alone; convert_weight refuses a preset
without --source in one line; compile builds a library from that mlc-chat-config.json whose
metadata lists exactly the stored tensors the weight mapping and the quantization scheme define
(computed here from the mapping, not from the IR). The GPT-2 library (full size, q4f16_1) also
runs on random weights and agrees with the NumPy interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlcc import ir
from mlcc.cli import app
from mlcc.frontend import resolve_model
from mlcc.quant import get_scheme

# preset -> the conversation template that fits it
PRESETS = {
    "qwen2_0_5b": "qwen2",
    "qwen2_1_5b": "qwen2",
    "stablelm_zephyr_3b": "stablelm-3b",
    "phi_2": "phi-2",
    "gemma_2b": "gemma_instruction",
    "gpt2": "gpt2",
    "santacoder": "gpt2",
    "mixtral_8x7b_v0.1": "mistral_default",
}
QUANT = "q4f16_1"


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def gen_config(preset: str, out: Path) -> dict:
    result = cli("gen_config", preset, "--quantization", QUANT, "--conv-template",
                 PRESETS[preset], "-o", out)
    assert result.exit_code == 0, result.output
    return json.loads((out / "mlc-chat-config.json").read_text())


def expected_stored(preset: str) -> list[dict]:
    """What convert_weight would write, in order: the mapping's parameters under the scheme."""
    source = resolve_model(preset)
    scheme = get_scheme(QUANT)
    return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
            for p in source.arch.weight_mapping(source.config).params
            for t in scheme.stored_tensors(p)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gen_config_from_the_preset_name(tmp_path: Path, preset: str) -> None:
    chat = gen_config(preset, tmp_path)
    source = resolve_model(preset)
    assert chat["model_type"] == source.arch.name and chat["quantization"] == QUANT
    assert chat["model_config"] == source.config.to_json()
    assert chat["conv_template"]["name"] == PRESETS[preset]
    assert chat["tokenizer_files"] == []
    assert chat["context_window_size"] == source.config.context_window_size


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_convert_weight_needs_a_source_for_a_preset(tmp_path: Path, preset: str) -> None:
    result = cli("convert_weight", preset, "--quantization", QUANT, "-o", tmp_path / "out")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: [convert_weight] ")
    assert "a preset has no weights; pass --source" in lines[0]


def compile_preset(preset: str, out: Path) -> Path:
    """gen_config, then compile in a child process (a crash in code generation fails this test
    instead of ending the test session)."""
    gen_config(preset, out)
    lib = out / "lib.so"
    result = subprocess.run([sys.executable, "-m", "mlcc.cli", "compile",
                             str(out / "mlc-chat-config.json"), "--device", "cpu", "-o", str(lib)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return lib


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_compile_from_the_preset_config(tmp_path: Path, preset: str) -> None:
    import tvm

    from mlcc.runtime_check.compiled import read_metadata

    metadata = read_metadata(tvm.runtime.load_module(str(compile_preset(preset, tmp_path))))
    assert metadata["model_type"] == resolve_model(preset).arch.name
    assert metadata["quantization"] == QUANT
    assert metadata["params"] == expected_stored(preset)


def random_params(params: list[dict], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in params:
        shape, dtype = tuple(p["shape"]), p["dtype"]
        if dtype == "uint32":
            out[p["name"]] = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
        elif p["name"].endswith("q_scale"):
            out[p["name"]] = rng.uniform(0.005, 0.02, shape).astype(dtype)
        elif "ln_" in p["name"] and p["name"].endswith("weight"):
            out[p["name"]] = (1 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        else:
            out[p["name"]] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return out


@pytest.mark.slow
def test_full_size_gpt2_library_runs_and_equals_the_interpreter(tmp_path: Path) -> None:
    import tvm

    from mlcc.passes import run_passes
    from mlcc.passes.dtype import ConvertModelDType
    from mlcc.passes.quantize import QuantizeWeights
    from mlcc.runtime_check.compiled import CompiledEngine, read_metadata

    lib = compile_preset("gpt2", tmp_path)
    params = random_params(read_metadata(tvm.runtime.load_module(str(lib)))["params"], 0)
    engine = CompiledEngine(lib, params)
    source = resolve_model("gpt2")
    module = run_passes(source.arch.build_module(source.config),
                        [ConvertModelDType("float16"), QuantizeWeights(QUANT)]).module
    cache = ir.KVCacheState(module.function("decode").inputs[1].type)
    prompt = [464, 2068, 7586, 21831]
    (want,) = ir.interpret(module, "prefill", [np.array(prompt, np.int32), cache], params)
    close_in_float16(engine.prefill_logits(prompt), want)
    (want,) = ir.interpret(module, "decode", [np.array([318], np.int32), cache], params)
    close_in_float16(engine.decode(318), want)


def close_in_float16(got: np.ndarray, want: np.ndarray) -> None:
    """Twelve float16 layers whose sums are rounded after differently ordered float32
    accumulations drift apart by some ulps: within 2% of the largest logit, same argmax."""
    assert np.abs(want).max() > 1.0 and want.std() > 0.5  # the tolerance means something
    np.testing.assert_allclose(got, want, atol=0.02 * float(np.abs(want).max()), rtol=0)
    assert int(np.argmax(got)) == int(np.argmax(want))
