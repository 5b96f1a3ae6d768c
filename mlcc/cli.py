"""Command-line shell of mlcc: parses arguments and calls library functions.

Each command is a thin typer function that turns options into a library call. A failure that
the library reports as `MlccError` is printed as one line on stderr with exit status 1; the
commands never print tracebacks for bad input.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

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
    output: Annotated[Path, typer.Option("--output", "-o", help="Library to write (.so or .tar).")],
    quantization: Annotated[str | None, typer.Option(
        "--quantization", help="Needed unless MODEL is an mlc-chat-config.json.")] = None,
    model_type: Annotated[str | None, typer.Option("--model-type", help="Architecture.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu/llvm or auto.")] = "auto",
    host: Annotated[str | None, typer.Option("--host", help="LLVM triple of the host.")] = None,
    opt: Annotated[str, typer.Option(
        "--opt", help='O0..O3, optionally with knobs: "O2;fuse_add_norm=0".')] = "O2",
    system_lib_prefix: Annotated[str | None, typer.Option(
        "--system-lib-prefix", help="Symbol prefix for a .tar linked into an app.")] = None,
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


if __name__ == "__main__":
    app()
