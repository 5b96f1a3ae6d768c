"""Command-line shell of mlcc: parses arguments and calls library functions."""

from __future__ import annotations

import typer

from mlcc import __version__

app = typer.Typer(
    name="mlcc",
    help="Compile Hugging Face language models into quantized weights and one model library.",
    no_args_is_help=True,
    add_completion=False,
)


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


if __name__ == "__main__":
    app()
