"""The benchmark harness's logic on tiny inputs: gate rules, summaries, lengths, the measuring
loops, the transformers peer against `generate()`, random checkpoints, the child protocol and
the report. No speed is asserted anywhere."""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import pytest

from benchmarks import gate, measure, report, spec
from benchmarks.host_overhead import per_call_seconds
from benchmarks.stats import Summary, rates, summarize
from mlcc.errors import MlccError

VOCAB = 11


class BigramRunner:
    """Next-token logits = table[last token]: greedy output is a walk through the table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.fed: list[int] = []

    def prefill(self, ids):
        self.fed = list(ids)
        return self.table[self.fed[-1]].copy()

    def decode(self, token):
        self.fed.append(int(token))
        return self.table[int(token)].copy()


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32)


# --- gate -------------------------------------------------------------------------------------


def walk(table: np.ndarray, start: int, n: int) -> list[int]:
    out, token = [], start
    for _ in range(n):
        token = int(np.argmax(table[token]))
        out.append(token)
    return out


def test_forced_logits_along_greedy_tokens_are_the_greedy_logits(table):
    runner = BigramRunner(table)
    tokens, logits = measure.greedy(runner, [1, 2, 3], 6)
    assert tokens == walk(table, 3, 6)
    np.testing.assert_array_equal(measure.forced_logits(runner, [1, 2, 3], tokens), logits)
    np.testing.assert_array_equal(logits[1:], table[tokens[:-1]])


def test_identical_level_passes():
    ref = np.random.default_rng(1).normal(size=(5, VOCAB))
    tokens = ref.argmax(axis=1).tolist()
    tol = gate.logits_tolerance(ref, "float32")
    verdict = gate.check_level(ref[:2], ref, ref + tol / 2, tokens, tokens, tol)
    assert verdict.passed and verdict.matching_tokens == 5
    assert verdict.max_error == pytest.approx(tol / 2)


def test_logits_beyond_tolerance_fail_even_with_equal_tokens():
    ref = np.random.default_rng(2).normal(size=(4, VOCAB))
    tokens = ref.argmax(axis=1).tolist()
    tol = gate.logits_tolerance(ref, "float16")
    bad = ref.copy()
    bad[1, 0] += 1.5 * tol
    verdict = gate.check_level(ref, ref, bad, tokens, tokens, tol)
    assert not verdict.passed and "differ from the interpreter's" in verdict.note
    # past the interpreter's rows, O0's logits are the reference
    late = ref.copy()
    late[3, 0] += 1.5 * tol
    verdict = gate.check_level(ref[:2], ref, late, tokens, tokens, tol)
    assert not verdict.passed and "differ from O0's" in verdict.note
    assert verdict.max_error == pytest.approx(1.5 * tol)


def test_divergence_at_a_near_tie_passes_and_a_clear_one_fails():
    ref = np.zeros((3, VOCAB))
    ref[:, 4] = 10.0
    ref[1, 7] = 10.0 - 1e-4  # step 1: tokens 4 and 7 are a near tie
    ref[1, 8] = 5.0
    tol = gate.logits_tolerance(ref, "float16")  # 0.2
    baseline = [4, 4, 4]
    tie = gate.check_level(ref, ref, ref, [4, 7, 1], baseline, tol)
    assert tie.passed and tie.matching_tokens == 1 and "near tie at token 1" in tie.note
    assert "the interpreter's" in tie.note
    clear = gate.check_level(ref, ref, ref, [4, 8, 1], baseline, tol)
    assert not clear.passed and "separate them by 5" in clear.note
    # a divergence after the interpreter's rows is judged on O0's logits
    late = gate.check_level(ref[:1], ref, ref, [4, 7, 1], baseline, tol)
    assert late.passed and "O0's logits" in late.note
    assert not gate.check_level(ref[:1], ref, ref, [4, 8, 1], baseline, tol).passed


def test_baseline_must_follow_the_interpreter():
    ref = np.zeros((2, VOCAB))
    ref[0, 3], ref[1, 5], ref[1, 6] = 2.0, 2.0, 2.0 - 1e-6
    tol = gate.logits_tolerance(ref, "float32")
    assert gate.check_baseline(ref, ref, [3, 6], tol).passed  # near tie at step 1
    wrong = gate.check_baseline(ref, ref, [4, 5], tol)
    assert not wrong.passed and "prefers 3" in wrong.note
    # only the interpreter's rows are judged; O0's own later rows are not compared
    longer = np.vstack([ref, np.full((2, VOCAB), 9.0)])
    verdict = gate.check_baseline(ref, longer, [3, 5, 0, 0], tol)
    assert verdict.passed and verdict.total_tokens == 4
    assert not gate.check_baseline(ref, ref[:1], [3, 5], tol).passed  # rows missing


def test_tolerance_scales_with_largest_logit_and_dtype():
    ref = np.array([[0.5, -40.0]])
    assert gate.logits_tolerance(ref, "float32") == pytest.approx(40e-3)
    assert gate.logits_tolerance(ref, "float16") == pytest.approx(0.8)
    assert gate.logits_tolerance(np.array([[0.1]]), "float32") == pytest.approx(1e-3)


# --- summaries, lengths, prompts, options ------------------------------------------------------


def test_summary_against_statistics():
    samples = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    s = summarize(samples)
    assert (s.median, s.low, s.high, s.count) == (statistics.median(samples), 1.0, 9.0, 6)
    assert Summary.from_json(s.to_json()) == s
    assert s.spread_percent() == pytest.approx(100 * 8.0 / statistics.median(samples))
    assert rates(64, [0.5, 2.0]) == [128.0, 32.0]
    with pytest.raises(ValueError):
        summarize([])


def test_lengths_leave_room_for_decode():
    assert spec.capped_lengths((128, 16, 64), 512, 32) == [16, 64, 128]
    assert spec.capped_lengths((16, 64, 128), 100, 32) == [16, 64]
    assert spec.capped_lengths((64, 128), 40, 32) == [7]


def test_bench_prompt_is_fixed_and_in_vocab():
    a = spec.bench_prompt(50, 20, bos_token_id=1, seed=0)
    assert a == spec.bench_prompt(50, 20, bos_token_id=1, seed=0)
    assert a != spec.bench_prompt(50, 20, bos_token_id=1, seed=1)
    assert a[0] == 1 and len(a) == 20 and all(3 <= t < 50 for t in a[1:])


def test_levels_knobs_and_devices():
    s = spec.SweepSpec(levels=("O2", "O0", "O2;fuse_add_norm=0"))
    assert s.compiled_levels == ("O0", "O2", "O2;fuse_add_norm=0")
    assert spec.level_slug("O2;fuse_add_norm=0") == "O2-fuse_add_norm=0"
    assert spec.parse_list("O0, O2;lm_head_last_row=0,") == ("O0", "O2;lm_head_last_row=0")
    with pytest.raises(MlccError, match=r"^\[benchmarks\] --opt 'O9'"):
        spec.SweepSpec(levels=("O9",))
    assert spec.SweepSpec(device="cuda:1", peers=spec.GPU_DEFAULT_PEERS).on_gpu
    assert not spec.SweepSpec(device="cpu").on_gpu
    with pytest.raises(MlccError, match=r"--device 'metal' is not supported by the harness"):
        spec.SweepSpec(device="metal")
    with pytest.raises(MlccError, match="--peer float64"):
        spec.SweepSpec(peers=("float64",))
    with pytest.raises(MlccError, match="--peer float16-compiled runs on a GPU only"):
        spec.SweepSpec(peers=("float16-compiled",))
    with pytest.raises(MlccError, match="--reference-steps must be >= 0"):
        spec.SweepSpec(reference_steps=-1)
    with pytest.raises(MlccError, match="--prompt-lengths '16,x'"):
        spec.parse_int_list("16,x", "--prompt-lengths")


# --- measuring loops -----------------------------------------------------------------------------


def test_repeat_within_stops_at_budget_but_runs_once():
    calls = []
    assert len(measure.repeat_within(lambda: calls.append(1), 5, budget=0.0)) == 1
    assert len(measure.repeat_within(lambda: calls.append(1), 3, budget=60.0)) == 3


def test_prefill_and_decode_summaries(table):
    runner = BigramRunner(table)
    prompt = spec.bench_prompt(VOCAB, 12, None)
    prefill = measure.measure_prefill(runner, prompt, [4, 12], repeats=3, budget=60.0)
    assert set(prefill) == {"4", "12"}
    assert prefill["12"]["tokens_per_second"]["count"] == 3
    assert prefill["4"]["ttft_ms"]["median"] > 0
    decode = measure.measure_decode(runner, prompt[:4], tokens=5, repeats=2, budget=60.0)
    assert decode["tokens_per_second"]["count"] == 2 and decode["step_ms"]["count"] == 10
    assert runner.fed == prompt[:4] + walk(table, prompt[3], 5)  # greedy, fed back


class BatchEngine:
    """Sequences of a bigram table, with CompiledEngine's batch interface."""

    def __init__(self, table: np.ndarray, sequences: int) -> None:
        self.table, self.max_sequences = table, sequences
        self.metadata = {"entries": {"decode": {}, **({"batch_decode": {}} if sequences > 1
                                                      else {})}}
        self.sequence, self.steps = 0, []

    def select_sequence(self, index: int) -> None:
        self.sequence = index

    def prefill_logits(self, ids):
        return self.table[ids[-1]]

    def batch_decode(self, ids):
        self.steps.append(list(ids))
        return self.table[np.asarray(ids)]


def test_batch_decode_counts_every_sequence_or_says_why_not(table):
    engine = BatchEngine(table, sequences=3)
    out = measure.measure_batch_decode(engine, [1, 2], tokens=4, repeats=2, budget=60.0)
    assert out["available"] and out["batch"] == 3
    assert out["tokens_per_second"]["count"] == 2
    assert len(engine.steps) == 3 * 4  # warm-up + 2 runs, 4 steps each
    assert engine.steps[1] == [walk(table, 2, 1)[0]] * 3 and engine.sequence == 0
    single = measure.measure_batch_decode(BatchEngine(table, 1), [1, 2], 4, 2, 60.0)
    assert not single["available"] and "--max-batch-size" in single["reason"]


def test_per_call_seconds_shrinks_batches_for_slow_calls():
    import time

    count = [0]

    def slow():
        count[0] += 1
        time.sleep(0.01)

    seconds = per_call_seconds(slow, calls=1000, batches=2, budget=0.1)
    assert seconds >= 0.01 and count[0] <= 1 + 2 * 5


# --- the peer ------------------------------------------------------------------------------------


@pytest.mark.slow  # imports transformers' generation stack: ~10-40 s on 2 busy cores
def test_torch_runner_greedy_equals_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from benchmarks.peer import TorchRunner

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.3, eos_token_id=None,
                                      pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    runner = TorchRunner(tmp_path, "float32", threads=1)
    prompt = [1, 17, 5, 40, 9]
    tokens, _ = measure.greedy(runner, prompt, 8)
    with torch.inference_mode():
        expected = runner.model.generate(torch.tensor([prompt]), max_new_tokens=8,
                                         do_sample=False)
    assert tokens == expected[0, len(prompt):].tolist()


# --- random checkpoints ---------------------------------------------------------------------


def test_random_checkpoint_is_float16_loadable_and_cached(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from benchmarks.models import ensure_random_checkpoint
    from mlcc.frontend import resolve_model

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 4, "vocab_size": 48, "tie_word_embeddings": False,
          "max_position_embeddings": 64}
    folder = tmp_path / "m"
    ensure_random_checkpoint(folder, hf)
    weights = load_file(folder / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {np.dtype("float16")}
    assert weights["lm_head.weight"].shape == (48, 32)
    assert resolve_model(folder).config.hidden_size == 32
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    ensure_random_checkpoint(folder, hf)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not (tmp_path / "m.partial").exists()


def test_unknown_model_name_is_refused(tmp_path):
    from benchmarks.models import resolve_bench_model

    with pytest.raises(MlccError, match="model 'no-such-model' is neither a folder"):
        resolve_bench_model("no-such-model", tmp_path)


# --- child processes ----------------------------------------------------------------------------


@pytest.mark.slow  # a child process imports TVM and mlcc afresh
def test_child_reports_a_missing_library_as_one_line(tmp_path):
    from benchmarks.child import run_child

    (tmp_path / "mlc-chat-config.json").write_text('{"model_type": "llama"}')
    result = run_child({"kind": "compiled", "lib": str(tmp_path / "none.so"),
                        "params": str(tmp_path)}, tmp_path, "missing", timeout=120, threads=1)
    assert result["error"].startswith("[runtime] model library") and "none.so" in result["error"]
    assert "\n" not in result["error"]
    assert result["rss"]["peak_bytes"] >= result["rss"]["start_bytes"] > 0


# --- the report ----------------------------------------------------------------------------------


def fake_run(decode: float) -> dict:
    s = {"median": decode, "low": decode * 0.9, "high": decode * 1.1, "count": 3}
    host = {"decode_step_us": 1e6 / decode, "direct_entry_us": 900.0,
            "marshal_us": 2.0, "ffi_call_us": 0.2, "host_us": 52.0, "host_percent": 5.2,
            "arguments": 10, "position": 4}
    return {"gate_tokens": [1, 2], "decode": {"tokens_per_second": s},
            "prefill": {"4": {"tokens_per_second": s, "ttft_ms": s}},
            "host_overhead": host, "rss": {"start_bytes": 1, "peak_bytes": 300e6},
            "batch_decode": {"available": False, "reason": "max_batch_size=1"}}


def fake_results(load: float) -> dict:
    compiled = {"seconds": 2.0, "stage_seconds": {"build IR": 0.1, "codegen + build": 1.9},
                "pass_seconds": {"quantize_weights": 0.01}}
    levels = {
        "O0": {"compile": compiled, "run": fake_run(100.0),
               "gate": {"passed": True, "note": "equal", "max_error": 0.0, "tolerance": 0.1,
                        "matching_tokens": 2, "total_tokens": 2}},
        "O2": {"compile": compiled, "run": fake_run(777.0),
               "gate": {"passed": False, "note": "token 0: differs", "max_error": 3.0,
                        "tolerance": 0.1, "matching_tokens": 0, "total_tokens": 2}},
        "O3": {"compile": {"error": "[compile] broken"}},
    }
    peers = {"float32": {**fake_run(50.0), "attention": "sdpa"},
             "float16": {"error": "did not finish within 10 s"}}
    model = {"name": "tiny", "random_weights": True, "levels": levels, "peers": peers,
             "weights": {"parameters": 1000, "bytes": 600, "bits_per_param": 4.8, "seconds": 1.0},
             "plan": {"lengths": [4], "decode_tokens": 2, "decode_prompt_length": 4,
                      "context_window_size": 64, "prefill_chunk_size": 64}}
    return {"command": "python -m benchmarks run --model tiny", "wall_seconds": 60.0,
            "spec": {"device": "cpu", "quantization": "q4f16_1", "threads": 2},
            "machine": {"date": "2026-11-28 12:00 UTC", "cpu": "Test CPU", "cores": 2,
                        "memory_bytes": 2**34, "os": "Linux", "load_average": [load, 0, 0],
                        "versions": {"python": "3.11"}, "git": "abc123"},
            "load_average_after": [load, 0, 0], "models": [model]}


def test_report_hides_speed_of_failing_levels_and_states_ratios():
    text = report.render_markdown(fake_results(load=0.1), [])
    assert "| mlcc O0 | pass: equal | 100.0 (90.0–110.0, n=3) |" in text
    assert "777" not in text  # the failing level's speed is not shown
    assert "not reported (gate failed)" in text and "[compile] broken" in text
    assert "mlcc O0: decode 2.00x, prefill 2.00x" in text
    assert "not run: did not finish within 10 s" in text
    assert "Other work ran" not in text
    assert "Other work ran" in report.render_markdown(fake_results(load=3.0), [])


def test_write_results_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    messages = []
    report.write_results(fake_results(0.1), tmp_path, messages.append)
    assert json.loads((tmp_path / "results.json").read_text())["models"][0]["name"] == "tiny"
    assert (tmp_path / "README.md").read_text().startswith("# mlcc CPU benchmark, 2026-11-28")
    assert not list(tmp_path.glob("*.png"))
    assert any("matplotlib is not installed" in m for m in messages)


def test_plots_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    report.write_results(fake_results(0.1), tmp_path, lambda m: None)
    for name in ("throughput.png", "compile_time.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![throughput.png](throughput.png)" in (tmp_path / "README.md").read_text()


def test_cli_refuses_unknown_devices_with_one_line(capsys):
    from benchmarks.__main__ import main

    assert main(["run", "--device", "metal", "--model", "stories260K"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("[benchmarks] --device 'metal'") and "\n" not in err


def test_gpu_peers_are_the_default_on_cuda():
    from benchmarks.__main__ import build_parser, spec_from_args

    args = build_parser().parse_args(["run", "--device", "cuda", "--reference-steps", "0"])
    built = spec_from_args(args)
    assert built.peers == spec.GPU_DEFAULT_PEERS and built.reference_steps == 0
    args = build_parser().parse_args(["run"])
    assert spec_from_args(args).peers == spec.PEER_DTYPES


def test_gpu_summary_takes_medians_and_the_roofline_fraction():
    from benchmarks.report import HBM_BYTES_PER_S, gpu_summary
    from benchmarks.stats import summarize

    def rate(*values):
        return summarize(list(values)).to_json()

    run = {"decode": {"tokens_per_second": rate(400.0, 500.0, 450.0)},
           "prefill": {"512": {"tokens_per_second": rate(6000.0)}},
           "batch_decode": {"available": True, "batch": 16,
                            "tokens_per_second": rate(3000.0, 3200.0)},
           "gpu_mem_bytes": 40e9, "kernels": {"weight_bytes_per_token": 3.72e9}}
    model = {"name": "random-llama2_7b", "plan": {"lengths": [32, 512]},
             "levels": {"O0": {"gate": {"passed": True}, "run": run},
                        "O2": {"gate": {"passed": False}, "run": run}},
             "peers": {"float16-compiled": {"decode": {"tokens_per_second": rate(120.0)}},
                       "float16": {"error": "out of memory"}}}
    results = {"machine": {"date": "d", "gpu": "NVIDIA H200"}, "command": "c",
               "models": [model]}
    summary = gpu_summary(results)["models"]["random-llama2_7b"]
    assert summary["O2"] == {"gate_passed": False}
    o0 = summary["O0"]
    assert o0["decode_tok_s"] == 450.0 and o0["prefill_tok_s"] == 6000.0
    assert o0["batch16_decode_tok_s"] == 3100.0 and o0["peak_gpu_mem_gb"] == 40.0
    assert o0["roofline_fraction"] == pytest.approx(450.0 * 3.72e9 / HBM_BYTES_PER_S)
    assert o0["peer_float16_compiled_decode_tok_s"] == 120.0
    assert o0["peer_float16_decode_tok_s"] is None


def test_ab_decode_rotates_the_first_library_and_tables_every_round(monkeypatch):
    import benchmarks.ab_decode as ab
    from mlcc.runtime_check import compiled

    calls: list[tuple[str, str]] = []

    class Engine:
        def __init__(self, lib, params, device):
            self.name = str(lib)

        def reset(self):
            calls.append(("reset", self.name))

        def prefill_logits(self, ids):
            assert ids == ab.prompt_ids(40) and len(set(ids)) == 40
            calls.append(("prefill", self.name))

        def decode(self, token):
            calls.append(("decode", self.name))

    monkeypatch.setattr(compiled, "CompiledEngine", Engine)
    rows = ab.measure("params", ["a.so", "b.so", "c.so"], rounds=4, steps=2, prompt=40)
    firsts = [name for (kind, name) in calls if kind == "reset"][::3]
    assert firsts == ["a.so", "b.so", "c.so", "a.so"]
    assert sum(kind == "decode" for kind, _ in calls) == 4 * 3 * 2
    assert {name: len(v) for name, v in rows.items()} == {"a.so": 4, "b.so": 4, "c.so": 4}
    text = ab.table({"x/a.so": [2e-3, 4e-3, 3e-3], "x/b.so": [1e-3, 1e-3, 4e-3]})
    a_row, b_row = text.splitlines()[2:]
    assert a_row == "| a.so | 3.00 | 3.00 | 2.00-4.00 | 333.3 | 1.00x |"
    assert b_row == "| b.so | 1.00 | 2.00 | 1.00-4.00 | 1000.0 | 3.00x |"


def test_ab_decode_pipelined_times_greedy_runs_after_one_unmeasured_each(monkeypatch):
    import benchmarks.ab_decode as ab
    from mlcc.runtime_check import compiled

    calls: list[tuple] = []

    class Logits:
        def argmax(self):
            return 5

    class Engine:
        def __init__(self, lib, params, device):
            self.name = str(lib)

        def reset(self):
            calls.append(("reset", self.name))

        def append(self, ids, on_device=False):
            assert ids == ab.prompt_ids(16) and on_device
            calls.append(("append", self.name))
            return Logits()

        def decode_greedy(self, token, steps):
            assert (token, steps) == (5, 8)
            calls.append(("greedy", self.name))
            return [5] * steps

    monkeypatch.setattr(compiled, "CompiledEngine", Engine)
    rows = ab.measure("params", ["a.so", "b.so"], rounds=3, steps=8, pipelined=True)
    greedy = [name for kind, name in calls if kind == "greedy"]
    # one unmeasured run each, then three rounds in turns, the first library rotating
    assert greedy == ["a.so", "b.so", "a.so", "b.so", "b.so", "a.so", "a.so", "b.so"]
    assert {name: len(v) for name, v in rows.items()} == {"a.so": 3, "b.so": 3}
    assert all(v >= 0 for values in rows.values() for v in values)
    assert all(kind in ("reset", "append", "greedy") for kind, _ in calls)


def test_ab_decode_batch_prefills_every_sequence_and_counts_their_tokens(monkeypatch):
    import benchmarks.ab_decode as ab
    from mlcc.runtime_check import compiled

    calls: list[tuple] = []

    class Engine:
        metadata = {"entries": {"decode": {}, "batch_decode": {}}}
        max_sequences = 4

        def __init__(self, lib, params, device):
            self.name, self.sequence = str(lib), 0

        def select_sequence(self, seq):
            self.sequence = seq

        def reset(self):
            calls.append(("reset", self.name, self.sequence))

        def prefill_logits(self, ids):
            calls.append(("prefill", self.name, self.sequence))

        def batch_decode(self, ids):
            calls.append(("batch", self.name, tuple(ids)))

    monkeypatch.setattr(compiled, "CompiledEngine", Engine)
    ab.measure("params", ["a.so", "b.so"], rounds=2, steps=3, batch=3)
    round_a = calls[:3 + 3 + 3]
    assert [c for c in round_a if c[0] == "prefill"] == [("prefill", "a.so", s) for s in range(3)]
    assert [c for c in round_a if c[0] == "reset"] == [("reset", "a.so", s) for s in range(3)]
    assert sum(c[0] == "batch" for c in calls) == 2 * 2 * 3
    assert {c[2] for c in calls if c[0] == "batch"} == {(7, 7, 7)}
    row = ab.table({"x/a.so": [4e-3]}, batch=16).splitlines()[2]
    assert row == "| a.so | 4.00 | 4.00 | 4.00-4.00 | 4000.0 | 1.00x |"
    with pytest.raises(SystemExit, match="max_batch_size=8"):
        ab.measure("params", ["a.so"], rounds=1, steps=1, batch=8)


class _TableEngine:
    """A decode engine whose logits are a fixed table: row i after the prompt and i tokens."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.at = rows, 0

    def reset(self):
        self.at = 0

    def append(self, ids):
        self.at = 0
        return self.rows[0]

    def decode(self, token):
        self.at += 1
        return self.rows[self.at]


def test_compare_libs_reports_differences_flips_and_free_running_agreement():
    from benchmarks.cuda.compare_libs import compare

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, 50)).astype(np.float32)
    same = compare(_TableEngine(rows), _TableEngine(rows.copy()), [1, 2], 5, log=lambda s: None)
    assert same["worst"] == 0.0 and same["flips"] == [] and same["agree"] == 5
    assert same["tokens"] == [int(np.argmax(r)) for r in rows[:5]]
    moved = rows.copy()
    top = np.argsort(rows[3])[-2:]
    moved[3, top[0]] = rows[3, top[1]] + 0.5  # step 3's runner-up becomes the argmax
    found = compare(_TableEngine(rows), _TableEngine(moved), [1, 2], 5, log=lambda s: None)
    gap = rows[3, top[1]] - rows[3, top[0]]
    assert found["flips"] == [f"step 3 (gap {gap:.4f})"] and found["agree"] == 3
    assert found["worst"] == pytest.approx((gap + 0.5) / np.abs(rows[3]).max(), rel=1e-5)
    moved[4, 0] = np.nan
    with pytest.raises(ValueError, match="step 4: the candidate's logits are not finite"):
        compare(_TableEngine(rows), _TableEngine(moved), [1, 2], 5, log=lambda s: None)
