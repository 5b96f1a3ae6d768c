"""Command-line shell of mlcc: parses arguments and calls library functions.

Each command is a thin typer function that turns options into a library call. A failure that
the library reports as `MlccError` is printed as one line on stderr with exit status 1; the
commands never print tracebacks for bad input.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from mlcc import __version__
from mlcc.errors import MlccError

app = typer.Typer(
    name="mlcc",
    help="Compile Hugging Face language models into quantized weights and one model library.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable)


def reports_errors(fn: F) -> F:
    """Print an MlccError as one line on stderr and exit 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MlccError as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mlcc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """mlcc: convert_weight, gen_config and compile a model, then chat with it."""


# Commands are registered below, one block each: convert_weight, gen_config, compile, chat, bench.

from pathlib import Path
from typing import Annotated


@app.command("convert_weight")
@reports_errors
def convert_weight_command(
    config: Annotated[str, typer.Argument(help="HF model folder, its config.json, or a preset.")],
    quantization: Annotated[str, typer.Option(
        "--quantization", help="q0f16, q0f32, q3f16_1, q4f16_1, q4f32_1, q8f16_1 or q4f16_awq.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Weights folder to write.")],
    model_type: Annotated[str | None, typer.Option(
        "--model-type", help="Architecture, when config.json's model_type is missing or differs.")
    ] = None,
    device: Annotated[str, typer.Option(
        "--device", help="Where to quantize: cpu, cuda, cuda:N or auto (same bytes on each).")
    ] = "cpu",
    source: Annotated[Path | None, typer.Option(
        "--source", help="Checkpoint folder or file, when it is not next to the config.")] = None,
    source_format: Annotated[str, typer.Option(
        "--source-format", help="auto, huggingface-safetensor or huggingface-torch.")] = "auto",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the weights of a non-empty output folder, keep other files.")
    ] = False,
) -> None:
    """Quantize an HF checkpoint into MLC's weight format (ndarray-cache.json + shards)."""
    from mlcc.interface.convert_weight import convert_weight, format_summary

    summary = convert_weight(config, quantization, output, model_type=model_type, device=device,
                             source=source, source_format=source_format, overwrite=overwrite)
    print(format_summary(summary), file=sys.stderr)


@app.command("compile")
@reports_errors
def compile_command(
    model: Annotated[str, typer.Argument(
        help="mlc-chat-config.json (or its folder), an HF folder, a config.json or a preset.")],
    output: Annotated[Path, typer.Option("--output", "-o", help=(
        "Library to write; the suffix picks the artifact: .so/.dylib/.dll shared library, .tar "
        "objects for static linking, .wasm WebAssembly module."))],
    quantization: Annotated[str | None, typer.Option(
        "--quantization", help="Needed unless MODEL is an mlc-chat-config.json.")] = None,
    model_type: Annotated[str | None, typer.Option("--model-type", help="Architecture.")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="cpu/llvm, cuda, cuda:N, cuda-sm_90,sm_80, iphone, android, metal, "
        "webgpu, rocm, opencl, a TVM target JSON, or auto (cuda if a GPU is visible).")
    ] = "auto",
    host: Annotated[str | None, typer.Option("--host", help=(
        "LLVM triple of the host code, e.g. arm64-apple-ios, aarch64-linux-android, "
        "arm64-apple-darwin, x86_64-pc-windows-msvc, wasm32-unknown-unknown-wasm, "
        "x86_64-linux-gnu; default: the device's."))] = None,
    opt: Annotated[str, typer.Option(
        "--opt", help='O0..O3, optionally with knobs: "O2;fuse_add_norm=0".')] = "O2",
    system_lib_prefix: Annotated[str | None, typer.Option(
        "--system-lib-prefix", help="Symbol prefix for a .tar linked into an app (default for "
        "iphone/android: <model_type>_<quantization>_).")] = None,
    overrides: Annotated[str | None, typer.Option(
        "--overrides", help='"context_window_size=..;prefill_chunk_size=..;..."')] = None,
    debug_dump: Annotated[Path | None, typer.Option(
        "--debug-dump", help="Write the IR after every pass into this folder.")] = None,
) -> None:
    """Compile a model into one library for a device."""
    from mlcc.interface.compile import compile_model

    def log(line: str) -> None:
        print(f"[compile] {line}", file=sys.stderr)

    log(f"model={model} output={output} quantization={quantization or '(from config)'} "
        f"device={device} host={host or '(default)'} opt={opt} overrides={overrides or '-'}")
    result = compile_model(model, output, quantization=quantization, model_type=model_type,
                           device=device, host=host, opt=opt,
                           system_lib_prefix=system_lib_prefix, overrides=overrides,
                           debug_dump=debug_dump, log=log)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.stage_seconds.items())
    log(f"done: {stages}")


ChatModelArg = Annotated[
    Path, typer.Argument(help="Params folder with mlc-chat-config.json (from gen_config).")
]
ModelLibOpt = Annotated[Path | None, typer.Option(
    "--model-lib-path", "--model-lib",
    help="Library from mlcc compile; default: the single *.so in MODEL or the folder above.")]
RunDeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]


@app.command("chat")
@reports_errors
def chat_command(
    model: ChatModelArg,
    model_lib_path: ModelLibOpt = None,
    device: RunDeviceOpt = "cpu",
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="Answer this message and exit instead of starting the REPL.")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", help="0 = greedy; default from mlc-chat-config.json.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus mass.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(
        "--repetition-penalty", help="1 = off.")] = None,
    max_gen_len: Annotated[int | None, typer.Option(
        "--max-gen-len", help="Most tokens per reply.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Makes sampling repeatable.")] = None,
) -> None:
    """Chat with a compiled model in the terminal (/help lists the REPL commands)."""
    from mlcc.runtime_check import ChatModule, GenerationConfig
    from mlcc.runtime_check.chat_module import run_prompt, run_repl

    config = GenerationConfig(temperature=temperature, top_p=top_p,
                              repetition_penalty=repetition_penalty, max_gen_len=max_gen_len,
                              seed=seed)
    chat = ChatModule(model, model_lib_path, device)
    if prompt is None:
        run_repl(chat, config)
    else:
        run_prompt(chat, prompt, config)


@app.command("bench")
@reports_errors
def bench_command(
    model: ChatModelArg,
    model_lib_path: ModelLibOpt = None,
    device: RunDeviceOpt = "cpu",
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt to prefill.")] = (
        "What is the meaning of life?"),
    generate_length: Annotated[int, typer.Option(
        "--generate-length", help="Tokens to generate, stop tokens ignored.")] = 256,
) -> None:
    """Measure prefill and decode throughput of a compiled model."""
    from mlcc.runtime_check import ChatModule
    from mlcc.runtime_check.chat_module import run_benchmark

    run_benchmark(ChatModule(model, model_lib_path, device), prompt, generate_length)


@app.command("gen_config")
@reports_errors
def gen_config_command(
    config: Annotated[str, typer.Argument(help="HF model folder, its config.json, or a preset.")],
    quantization: Annotated[str, typer.Option(
        "--quantization", help="Quantization the weights use, e.g. q4f16_1.")],
    conv_template: Annotated[str, typer.Option(
        "--conv-template", help="Conversation template name (e.g. llama-2, LM) or a .json file.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder for mlc-chat-config.json and the tokenizer files.")],
    model_type: Annotated[str | None, typer.Option(
        "--model-type", help="Architecture, when config.json's model_type is missing or differs.")
    ] = None,
    context_window_size: Annotated[int | None, typer.Option(
        "--context-window-size", help="Longest sequence kept in the KV cache.")] = None,
    sliding_window_size: Annotated[int | None, typer.Option(
        "--sliding-window-size", help="Sliding attention window; -1 turns it off.")] = None,
    prefill_chunk_size: Annotated[int | None, typer.Option(
        "--prefill-chunk-size", "--prefill_chunk_size",
        help="Most tokens per prefill call (at most the window).")] = None,
    attention_sink_size: Annotated[int | None, typer.Option(
        "--attention-sink-size", help="First tokens kept visible with a sliding window.")] = None,
    tensor_parallel_shards: Annotated[int | None, typer.Option(
        "--tensor-parallel-shards", "--tensor-parallel-shard",
        help="GPUs the model is split across.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        "--max-batch-size", help="Most sequences decoded together.")] = None,
) -> None:
    """Write mlc-chat-config.json and the tokenizer files for a model."""
    from mlcc.interface.gen_config import gen_config, log_to_stderr

    log_to_stderr()
    gen_config(config, quantization, conv_template, output, model_type=model_type,
               context_window_size=context_window_size, sliding_window_size=sliding_window_size,
               prefill_chunk_size=prefill_chunk_size, attention_sink_size=attention_sink_size,
               tensor_parallel_shards=tensor_parallel_shards, max_batch_size=max_batch_size)


if __name__ == "__main__":
    app()
