"""`mlcc convert_weight`: HF checkpoint -> quantized MLC weights folder (ndarray-cache.json + shards).

Parameters stream from the frontend's lazy loader through the quantization scheme into the
shard writer one at a time, so memory stays near one source file plus one output tensor. All
output goes to a hidden sibling folder that is renamed into place only when complete: a failed or
interrupted run leaves nothing behind, and `overwrite` swaps in the new weights while keeping the
folder's other files (mlc-chat-config.json, tokenizer files).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mlcc.errors import MlccError
from mlcc.frontend.architecture import ParamSource, WeightMapping
from mlcc.frontend.hf_weights import Checkpoint, iter_params, open_checkpoint
from mlcc.frontend.ndarray_cache import INDEX_FILE, NDArrayCacheWriter
from mlcc.frontend.registry import resolve_model
from mlcc.quant import QuantScheme, get_scheme

STAGE = "convert_weight"


def convert_weight(
    config: str | Path,
    quantization: str,
    output: Path,
    model_type: str | None = None,
    device: str = "cpu",
    source: Path | None = None,
    source_format: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert a model's weights into `output`; returns a summary of what was written.

    `config` is an HF folder, a config.json or a preset name; `source` points at the weights
    when they are not next to the config (required for presets). `device` ("cpu", "cuda",
    "cuda:N" or "auto") is where quantization runs; the bytes written are the same on all.
    """
    started = time.perf_counter()
    scheme = get_scheme(quantization)
    torch_device = resolve_device(device)
    model = resolve_model(config, model_type)
    weights_at = Path(source) if source is not None else model.hf_dir
    if weights_at is None:
        raise MlccError(STAGE, f"{config}: a preset has no weights; pass --source with the folder "
                        "or file holding the checkpoint")
    output = Path(os.path.abspath(output))  # "." and "x/.." need a real name and parent
    check_output(output, overwrite)
    check_checkpoint_kind(model.hf_config, scheme, weights_at)
    mapping = model.arch.weight_mapping(model.config)
    checkpoint = open_checkpoint(model.hf_dir, source, source_format)
    with sigterm_as_interrupt(), staging_folder(output) as staging:
        writer = NDArrayCacheWriter(staging)
        try:
            stream = stream_params(mapping, checkpoint, scheme, torch_device)
            _write_all(stream, writer, mapping, progress)
        except BaseException:
            writer.abort()
            raise
        num_weights = sum(math.prod(p.shape) for p in mapping.params)
        written = writer.finish(num_weights=num_weights)
    return {
        "output": str(output), "model_type": model.arch.name, "quantization": scheme.name,
        "device": str(torch_device), "parameters": num_weights, "tensors": written["tensors"],
        "bytes": written["bytes"], "shards": written["shards"],
        "bits_per_param": written["bits_per_param"], "seconds": time.perf_counter() - started,
    }


def resolve_device(device: str) -> torch.device:
    """The torch device quantization runs on; MlccError when it is unknown or absent."""
    if device in ("cpu", "llvm"):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise MlccError(STAGE, f"--device {device!r} is not supported for weight conversion; "
                        "use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise MlccError(STAGE, f"--device {device}: CUDA is not available to torch "
                        f"{torch.__version__} (no GPU visible or a CPU-only build); use --device "
                        "cpu, which writes the same bytes")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise MlccError(STAGE, f"--device {device}: only {torch.cuda.device_count()} CUDA "
                        f"device(s) visible; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def check_checkpoint_kind(hf_config: dict, scheme: QuantScheme, weights_at: Path) -> None:
    """Refuse AWQ mode on a float checkpoint and a float scheme on an AWQ checkpoint."""
    quant_config = hf_config.get("quantization_config") or {}
    method = quant_config.get("quant_method") if isinstance(quant_config, dict) else None
    if scheme.kind == "awq" and method != "awq":
        raise MlccError(STAGE, f"{weights_at}: --quantization {scheme.name} needs an AutoAWQ "
                        "checkpoint (config.json quantization_config.quant_method 'awq', got "
                        f"{method!r}); quantize this float checkpoint with q4f16_1 instead")
    if scheme.kind != "awq" and method is not None:
        raise MlccError(STAGE, f"{weights_at}: the checkpoint is already quantized "
                        f"(quant_method {method!r}); use --quantization q4f16_awq for AutoAWQ "
                        "checkpoints or convert the original float weights")
    if scheme.kind == "awq":
        # (key, its spelling in older AutoAWQ configs, the value the scheme reads)
        expected = (("bits", "w_bit", scheme.bits),
                    ("group_size", "q_group_size", scheme.group_size),
                    ("version", "version", "gemm"), ("zero_point", "zero_point", True))
        for key, old_key, value in expected:
            found = quant_config.get(key, quant_config.get(old_key))
            if isinstance(found, str):
                found = found.lower()
            if found != value:
                raise MlccError(STAGE, f"{weights_at}: quantization_config.{key} is {found!r}, "
                                f"{scheme.name} reads AutoAWQ checkpoints with {key} {value!r}")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty folder without overwrite, or not writable."""
    if output.exists() and not output.is_dir():
        raise MlccError(STAGE, f"{output}: exists and is not a folder; --output must name a "
                        "folder (new or empty)")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise MlccError(STAGE, f"{output}: folder is not empty; pass --overwrite to replace its "
                        "weights (its other files are kept) or choose another --output")
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MlccError(STAGE, f"{output}: cannot create it, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MlccError(STAGE, f"{output}: no permission to write in {ancestor}; choose another "
                        "--output or fix the folder's permissions")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C while it is active, so the staging folder is removed.

    A library on the stack may turn the KeyboardInterrupt into an error of its own (or fail in
    its cleanup); once SIGTERM has arrived, whatever error comes out is reported as the
    interrupt it was, so the command still ends as interrupted.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except Exception as err:
        if received:
            raise KeyboardInterrupt from err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A hidden sibling folder to write into, moved to `output` only if the body succeeds."""
    created = _make_parents(output.parent)
    try:
        staging = _make_sibling(output, "partial")
    except OSError as err:
        _remove_created(created)
        raise MlccError(STAGE, f"{output}: cannot create a folder in {output.parent} "
                        f"({err.strerror}); choose another --output") from None
    try:
        yield staging
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        raise


def _make_sibling(output: Path, suffix: str) -> Path:
    """A new hidden folder next to `output`, with the permissions a plain mkdir would give."""
    while True:
        path = output.parent / f".{output.name}.{secrets.token_hex(4)}.{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _make_parents(folder: Path) -> list[Path]:
    """Create missing parent folders; returns the ones created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as err:
            _remove_created(missing[missing.index(path) + 1:])
            raise MlccError(STAGE, f"{path}: cannot create folder ({err.strerror}); choose "
                            "another --output") from None
    return missing


def _remove_created(created: list[Path]) -> None:
    for path in created:  # deepest first, so each is empty when its turn comes
        with contextlib.suppress(OSError):
            path.rmdir()


def is_weight_file(name: str) -> bool:
    """Files of a weights folder that convert_weight owns and replaces."""
    return name == INDEX_FILE or (name.startswith("params_shard_") and name.endswith(".bin"))


def _publish(staging: Path, output: Path) -> None:
    """Move the finished weights into place, keeping the non-weight files already there."""
    if not output.exists() or not any(output.iterdir()):
        os.replace(staging, output)  # an empty folder is replaced in one rename
        return
    for entry in output.iterdir():
        if not is_weight_file(entry.name):
            _link_or_copy(entry, staging / entry.name)
    retired = _make_sibling(output, "old")
    os.replace(output, retired)
    try:
        os.replace(staging, output)
    except OSError:
        os.replace(retired, output)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src: str | Path, dst: str | Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stream_params(
    mapping: WeightMapping, checkpoint: Checkpoint, scheme: QuantScheme, device: torch.device
) -> Iterator[tuple[ParamSource, dict[str, np.ndarray]]]:
    """(parameter, {stored name: array}) for every parameter, checked and converted."""
    if scheme.kind == "awq":
        yield from stream_awq_params(mapping, checkpoint, scheme, device)
    else:
        yield from stream_float_params(mapping, checkpoint, scheme, device)


def stream_float_params(
    mapping: WeightMapping, checkpoint: Checkpoint, scheme: QuantScheme, device: torch.device
) -> Iterator[tuple[ParamSource, dict[str, np.ndarray]]]:
    """Float HF tensors through the frontend's lazy loader, quantized on `device` or cast."""
    for param, tensor in iter_params(mapping, checkpoint):
        if scheme.applies_to(param):
            tensor = tensor.to(device)
        check_finite(param, tensor)
        yield param, scheme.convert(param, tensor)


# Tensors of one AutoAWQ linear layer X: X.qweight, X.qzeros, X.scales.
AWQ_PARTS = ("qweight", "qzeros", "scales")


def awq_tensor_names(param: ParamSource) -> list[str]:
    """The AutoAWQ tensors that replace the float HF weights of `param`."""
    return [f"{hf.removesuffix('.weight')}.{part}" for hf in param.hf_names for part in AWQ_PARTS]


def stream_awq_params(
    mapping: WeightMapping, checkpoint: Checkpoint, scheme: QuantScheme, device: torch.device
) -> Iterator[tuple[ParamSource, dict[str, np.ndarray]]]:
    """AutoAWQ checkpoints: float parameters through the frontend's loader, then the packed
    linear layers, read file by file and repacked into mlcc's layout."""
    quantized = [p for p in mapping.params if scheme.applies_to(p)]
    floats = WeightMapping(tuple(p for p in mapping.params if not scheme.applies_to(p)),
                           (*mapping.unused, r".*\.(qweight|qzeros|scales)"))
    yield from stream_float_params(floats, checkpoint, scheme, device)
    located = checkpoint.locate()
    missing = [name for p in quantized for name in awq_tensor_names(p) if name not in located]
    if missing:
        raise MlccError(STAGE, f"{missing[0]}: missing from the AutoAWQ checkpoint in "
                        f"{checkpoint.root} ({len(missing)} AWQ tensors missing in all); "
                        f"{scheme.name} needs qweight, qzeros and scales for every linear layer")
    plan: dict[Path, list[ParamSource]] = {}
    for param in quantized:
        for path in dict.fromkeys(located[name] for name in awq_tensor_names(param)):
            plan.setdefault(path, []).append(param)
    waiting: dict[str, dict[str, np.ndarray]] = {}
    for path in checkpoint.files:  # one file open at a time, as the frontend's loader does
        if path not in plan:
            continue
        with checkpoint.open_file(path) as shard:
            for param in plan[path]:
                parts = waiting.setdefault(param.name, {})
                for name in awq_tensor_names(param):
                    if located[name] == path:
                        parts[name] = _awq_array(shard.get(name), name, path)
                if len(parts) == len(param.hf_names) * len(AWQ_PARTS):
                    del waiting[param.name]
                    yield param, convert_awq_param(scheme, param, parts, located)


def _awq_array(tensor: torch.Tensor, name: str, path: Path) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.to(torch.float32)
    array = tensor.numpy()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise MlccError(STAGE, f"{name}: {int((~np.isfinite(array)).sum())} NaN/inf value(s) in "
                        f"{path.name}; the checkpoint is corrupt, re-export or re-download it")
    return array


def convert_awq_param(
    scheme: QuantScheme, param: ParamSource, parts: dict[str, np.ndarray],
    located: dict[str, Path],
) -> dict[str, np.ndarray]:
    """One fused parameter from its AutoAWQ layers: each repacked, then combined by rows."""
    pieces = []
    for hf, (rows, cols) in zip(param.hf_names, param.hf_shapes):
        stem = hf.removesuffix(".weight")
        qweight = parts[f"{stem}.qweight"]
        if qweight.shape != (cols, rows // 8):
            raise MlccError(STAGE, f"{stem}.qweight: expected {(cols, rows // 8)} (in_features, "
                            f"out_features / 8) for {param.name}, got {qweight.shape} in "
                            f"{located[stem + '.qweight'].name}")
        pieces.append(scheme.from_awq(qweight, parts[f"{stem}.qzeros"], parts[f"{stem}.scales"],
                                      stem))
    names = scheme.stored_names(param.name)
    return {names[part]: combine_rows(param, [piece[part] for piece in pieces])
            for part in pieces[0]}


def combine_rows(param: ParamSource, arrays: list[np.ndarray]) -> np.ndarray:
    """Combine per-output-row arrays as the frontend combines the float weights."""
    if param.combine == "identity":
        return arrays[0]
    if param.combine == "concat0":
        return np.concatenate(arrays, axis=0)
    fused = arrays[0]  # neox_qkv: rows per head [q_h, k_h, v_h] -> all q, all k, all v
    per_head = fused.shape[0] // (3 * param.heads)
    regrouped = fused.reshape(param.heads, 3, per_head, *fused.shape[1:]).swapaxes(0, 1)
    return np.ascontiguousarray(regrouped.reshape(fused.shape))


def check_finite(param: ParamSource, tensor: torch.Tensor) -> None:
    """Refuse NaN or inf weights, naming the parameter and where they came from."""
    if not tensor.is_floating_point():
        return
    # In slices: isfinite on a whole float16 embedding allocates several times its size.
    flat = tensor.reshape(-1)
    if all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 20)):
        return
    bad_mask = ~torch.isfinite(tensor)
    bad = int(bad_mask.sum())
    first = tuple(int(i) for i in torch.nonzero(bad_mask)[0])
    raise MlccError(STAGE, f"{param.name}: {bad} NaN/inf value(s), first at index {first} (from "
                    f"{', '.join(param.hf_names)}); the checkpoint is corrupt, re-export or "
                    "re-download it")


def _write_all(stream: Iterator[tuple[ParamSource, dict[str, np.ndarray]]],
               writer: NDArrayCacheWriter, mapping: WeightMapping, progress: bool) -> None:
    """Drain `stream` into `writer` under a per-tensor progress bar on stderr."""
    console = Console(file=sys.stderr)
    # Progress counts each parameter's float32 bytes, whatever the source and stored dtypes.
    total = sum(math.prod(p.shape) * 4 for p in mapping.params)
    columns = (TextColumn("{task.description}", style="cyan"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (progress and console.is_terminal),
                  transient=True) as bar:
        task = bar.add_task("converting", total=total)
        for param, arrays in stream:
            for name, array in arrays.items():
                writer.add(name, array)
            bar.update(task, advance=math.prod(param.shape) * 4, description=param.name)


def format_summary(summary: dict) -> str:
    """The closing lines printed by the CLI."""
    return (f"Wrote {summary['tensors']} tensors ({summary['parameters']:,} parameters, "
            f"{summary['bytes'] / 2**20:.1f} MiB in {summary['shards']} shard(s), "
            f"{summary['bits_per_param']:.3f} bits/param) with {summary['quantization']} on "
            f"{summary['device']} to {summary['output']} in {summary['seconds']:.1f} s")
