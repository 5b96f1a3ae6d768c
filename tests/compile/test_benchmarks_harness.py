"""The benchmark sweep end to end on a tiny random Llama: convert, compile O0 and O2, gate,
measure, peer, report. Numbers are checked against transformers and the interpreter; speeds
are only checked to exist."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from benchmarks.child import run_child
from benchmarks.gate import check_level, logits_tolerance
from benchmarks.report import write_results
from benchmarks.spec import SweepSpec
from benchmarks.sweep import bench_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    spec = SweepSpec(models=(str(hf_dir),), levels=("O0", "O2"), quantization="q0f32",
                     prompt_lengths=(8, 16, 64), decode_tokens=4, gate_tokens=8, repeats=2,
                     budget_seconds=2.0, threads=1, peers=("float32",), child_timeout=300)
    cache = tmp_path_factory.mktemp("cache")
    model = bench_model(str(hf_dir), spec, cache, lambda message: None)
    return spec, model, cache


@pytest.mark.slow
def test_levels_pass_the_gate_and_match_transformers(swept):
    _, model, _ = swept
    levels, peer = model["levels"], model["peers"]["float32"]
    assert list(levels) == ["O0", "O2"]
    for level, entry in levels.items():
        assert entry["gate"]["passed"], (level, entry["gate"])
        assert entry["gate"]["max_error"] <= entry["gate"]["tolerance"]
    # q0f32 computes in float32: O0's greedy tokens are transformers' greedy tokens
    assert levels["O0"]["run"]["gate_tokens"] == peer["gate_tokens"]
    assert levels["O2"]["run"]["gate_tokens"] == peer["gate_tokens"]


@pytest.mark.slow
def test_every_figure_is_recorded(swept, tmp_path):
    _, model, cache = swept
    assert model["plan"]["lengths"] == [8, 16]  # 64 leaves no room in a 64-token context
    run = model["levels"]["O2"]["run"]
    assert set(run["prefill"]) == {"8", "16"}
    assert 1 <= run["decode"]["tokens_per_second"]["count"] <= 2
    assert run["decode"]["tokens_per_second"]["median"] > 0
    index = json.loads((next((cache / "work").iterdir()) / "params" /
                        "ndarray-cache.json").read_text())
    tensors = sum(len(shard["records"]) for shard in index["records"])
    # tokens, seq_info, page table, KV pool, every weight, logits, workspace
    assert run["host_overhead"]["arguments"] == 4 + tensors + 2
    assert run["host_overhead"]["host_us"] > 0
    assert run["batch_decode"]["available"] is False
    assert run["rss"]["peak_bytes"] > 0
    compiled = model["levels"]["O2"]["compile"]
    assert "lm_head_last_row" in compiled["pass_seconds"]
    assert "lm_head_last_row" not in model["levels"]["O0"]["compile"]["pass_seconds"]
    results = {"command": "python -m benchmarks run", "spec": SweepSpec().to_json(),
               "wall_seconds": 1.0, "load_average_after": None, "models": [model],
               "machine": {"date": "2026-11-28 00:00 UTC", "cpu": "cpu", "cores": 1,
                           "memory_bytes": None, "os": "Linux", "load_average": None,
                           "versions": {}, "git": "x"}}
    write_results(results, tmp_path, lambda message: None)
    text = (tmp_path / "README.md").read_text()
    assert "| mlcc O2 | pass: same tokens as O0 |" in text
    assert "transformers float32" in text


@pytest.mark.slow
def test_gate_catches_a_level_that_computes_something_else(swept, tmp_path):
    _, model, cache = swept
    params = next((cache / "work").iterdir()) / "params"
    wrong = tmp_path / "params"
    shutil.copytree(params, wrong)
    from mlcc.frontend.ndarray_cache import load_ndarray_cache

    arrays = load_ndarray_cache(wrong)
    norm = next(name for name in arrays if name.endswith("input_layernorm.weight"))
    # same names, shapes and dtypes, other values: only the numbers can give it away
    index = json.loads((wrong / "ndarray-cache.json").read_text())
    for shard in index["records"]:
        for record in shard["records"]:
            if record["name"] == norm:
                path = wrong / shard["dataPath"]
                data = bytearray(path.read_bytes())
                start = record["byteOffset"]
                values = np.frombuffer(data[start:start + record["nbytes"]], np.float32) * 3
                data[start:start + record["nbytes"]] = values.tobytes()
                path.write_bytes(bytes(data))
                shard["md5sum"] = hashlib.md5(data).hexdigest()
    (wrong / "ndarray-cache.json").write_text(json.dumps(index))
    baseline = model["levels"]["O0"]["run"]["gate_tokens"]
    job = {"kind": "compiled", "lib": str(next((cache / "work").iterdir()) / "O2.so"),
           "params": str(wrong), "gate_prompt": model["gate_prompt"],
           "gate_tokens": len(baseline), "forced_tokens": baseline,
           "logits_out": str(tmp_path / "wrong.npy"), "prompt": model["gate_prompt"],
           "lengths": [8], "decode_prompt_length": 8, "decode_tokens": 2, "repeats": 1,
           "budget": 0.1}
    result = run_child(job, tmp_path, "wrong", timeout=300, threads=1)
    assert "error" not in result, result
    work = next((cache / "work").iterdir())
    reference = np.load(work / "logits-reference.npy")
    verdict = check_level(reference, np.load(work / "logits-O0.npy"),
                          np.load(tmp_path / "wrong.npy"), result["gate_tokens"], baseline,
                          logits_tolerance(reference, "float32"))
    assert not verdict.passed and verdict.max_error > verdict.tolerance


@pytest.mark.slow
def test_prebuilt_libraries_are_measured_where_nothing_compiles(swept, tmp_path):
    """`build` then `run --prebuilt` (the GPU machine's flow, here on the CPU): the libraries
    come from the build folder, the gate holds every level to O0 without the interpreter, and
    a build from another config is refused."""
    from benchmarks.sweep import build_model

    spec, model, cache = swept
    own_cache = tmp_path / "cache"
    shutil.copytree(cache / "libs", own_cache / "libs")  # the same builds: reused, not redone
    out = tmp_path / "prebuilt"
    manifest = build_model(model["hf_dir"], spec, own_cache, out, lambda message: None)
    assert set(manifest["levels"]) == {"O0", "O2"}
    assert all((out / manifest["model"] / e["file"]).is_file()
               for e in manifest["levels"].values())
    measured_spec = SweepSpec(**{**spec.to_json(), "prebuilt": str(out), "reference_steps": 0,
                                 "peers": ()})
    measured = bench_model(model["hf_dir"], measured_spec, own_cache, lambda message: None)
    for level in ("O0", "O2"):
        entry = measured["levels"][level]
        assert entry["compile"]["reused"] and entry["gate"]["passed"], entry
        assert entry["run"]["gate_tokens"] == model["levels"][level]["run"]["gate_tokens"]
    assert "--reference-steps 0" in measured["levels"]["O0"]["gate"]["note"]
    path = out / manifest["model"] / "build.json"
    edited = json.loads(path.read_text())
    edited["chat_config"]["context_window_size"] += 1
    path.write_text(json.dumps(edited))
    from mlcc.errors import MlccError

    with pytest.raises(MlccError, match="built from another mlc-chat-config.json .*"
                       "context_window_size"):
        bench_model(model["hf_dir"], measured_spec, own_cache, lambda message: None)


@pytest.mark.slow
def test_static_cache_peer_generates_what_eager_transformers_does(tmp_path):
    """The GPU's torch.compile peer (StaticCache + compiled decode step), run here on the CPU
    with inductor's default mode: greedy tokens equal eager transformers', also after a reset."""
    from benchmarks.peer import CompiledRunner, TorchRunner

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.2)
    transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(tmp_path)
    prompt = [1, 5, 7, 9, 11]

    def walk(runner, steps=6):
        logits, tokens = runner.prefill(prompt), []
        for _ in range(steps):
            tokens.append(int(np.argmax(logits)))
            logits = runner.decode(tokens[-1])
        return tokens

    compiled = CompiledRunner(tmp_path, 40, device="cpu")
    expected = walk(TorchRunner(tmp_path, "float16", 1))
    assert walk(compiled) == expected
    assert walk(compiled) == expected  # the static cache is reset between sequences
