"""Build a model library: kernels + entry functions + embedded metadata, for one target.

    build_library(kernels, entries, metadata, target, output_path, system_lib_prefix=None)

`kernels` are public PrimFuncs (named by their `global_symbol`), `entries` the host functions of
`EntryBuilder` (or any PrimFuncs calling the kernels through `T.call_cpacked`). The suffix of
`output_path` picks the artifact: `.so` (linked with the host C compiler) or `.tar` (object files
for static linking; loading a .tar relinks it). The file is written under a temporary name in the
same folder and renamed when complete, so a failed build never leaves a half-written library.

The library carries its metadata as JSON, readable with the TVM runtime alone:
`mlcc_metadata_nbytes() -> int64` and `mlcc_metadata(out: uint8[n >= nbytes])`, which copies the
bytes (ASCII JSON) into `out`. Required keys: model_type, quantization, params (list of {name,
shape, dtype} in load order). `build_library` adds entries (each entry's signature), kernels,
target and compiler versions, and unless given: symbol_bounds, kv_cache (the kv_cache arguments'
shapes and dtypes) and memory (params, workspace and KV bytes). Targets: `make_target("cpu" | "llvm" | dict | Target, host)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tvm
from tvm import tirx

from mlcc import __version__
from mlcc.errors import MlccError

STAGE = "compile"
METADATA_SIZE_FUNC = "mlcc_metadata_nbytes"
METADATA_FUNC = "mlcc_metadata"
REQUIRED_METADATA = ("model_type", "quantization", "params")
SUFFIXES = (".so", ".tar")


def make_target(device: str | Mapping[str, Any] | tvm.target.Target = "cpu",
                host: str | None = None) -> tvm.target.Target:
    """An LLVM target for the CPU: all cores, the host CPU's features unless cross-compiling."""
    if isinstance(device, tvm.target.Target):
        return device
    if isinstance(device, Mapping):
        return tvm.target.Target(dict(device))
    if device not in ("cpu", "llvm"):
        raise MlccError(STAGE, f"--device {device!r} has no backend here; the LLVM backend "
                        "builds for cpu/llvm (or pass a TVM target dict)")
    from tvm.target import codegen

    config: dict[str, Any] = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    if host:
        config["mtriple"] = host
    else:
        # Without mcpu, LLVM targets a baseline x86-64: no AVX, and float16 through libcalls.
        config["mcpu"] = codegen.llvm_get_system_cpu()
    return tvm.target.Target(config)


def build_library(kernels: Mapping[str, tirx.PrimFunc] | Sequence[tirx.PrimFunc],
                  entries: Sequence[tirx.PrimFunc], metadata: Mapping[str, Any],
                  target: str | Mapping[str, Any] | tvm.target.Target,
                  output_path: str | Path, system_lib_prefix: str | None = None,
                  host: str | None = None) -> dict[str, Any]:
    """Compile everything into `output_path`; returns the metadata embedded in the library."""
    output = Path(output_path)
    if output.suffix not in SUFFIXES:
        raise MlccError(STAGE, f"{output}: suffix {output.suffix or '(none)'} is not built by "
                        f"the LLVM backend; use {' or '.join(SUFFIXES)} (.dylib/.dll/.wasm need "
                        "their platform toolchains)")
    tvm_target = make_target(target, host)
    functions = _collect(kernels, entries)
    full = complete_metadata(metadata, entries, functions, tvm_target)
    functions.update(metadata_functions(full))
    module = tvm.IRModule(functions)
    if system_lib_prefix:
        module = _with_prefix(module, system_lib_prefix)
    executable = tvm.compile(module, target=tvm_target)
    _export(executable, output)
    return full


def _name_of(func: tirx.PrimFunc) -> str:
    name = func.attrs.get("global_symbol") if func.attrs is not None else None
    if not name:
        raise MlccError(STAGE, "a kernel or entry has no global_symbol; name every PrimFunc")
    return str(name)


def _collect(kernels, entries) -> dict[str, tirx.PrimFunc]:
    funcs = list(kernels.values()) if isinstance(kernels, Mapping) else list(kernels)
    out: dict[str, tirx.PrimFunc] = {}
    for func in funcs + list(entries):
        name = _name_of(func)
        if name in (METADATA_FUNC, METADATA_SIZE_FUNC):
            raise MlccError(STAGE, f"function name {name} is reserved for the library metadata")
        if name in out and not out[name].same_as(func):
            raise MlccError(STAGE, f"two different functions are named {name}; kernel and entry "
                            "names must be unique in a library")
        out[name] = func
    return out


def complete_metadata(metadata: Mapping[str, Any], entries: Sequence[tirx.PrimFunc],
                      functions: Mapping[str, tirx.PrimFunc],
                      target: tvm.target.Target) -> dict[str, Any]:
    """Check the required keys and add entries, kernels, target and versions."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise MlccError(STAGE, f"library metadata lacks {', '.join(missing)}; give model_type, "
                        "quantization and the params list")
    full = dict(metadata)
    signatures = {}
    for func in entries:
        text = func.attrs.get("mlcc.signature") if func.attrs is not None else None
        signatures[_name_of(func)] = json.loads(str(text)) if text else {"name": _name_of(func)}
    entry_names = set(signatures)
    full.setdefault("entries", signatures)
    for key, value in derived_metadata(full["params"], signatures.values()).items():
        full.setdefault(key, value)
    full["kernels"] = sorted(n for n in functions if n not in entry_names)
    full["target"] = str(target)
    full["compiler"] = {"mlcc": __version__, "tvm": tvm.__version__}
    try:
        json.dumps(full)
    except (TypeError, ValueError) as err:
        raise MlccError(STAGE, f"library metadata is not JSON-serializable ({err}); use "
                        "plain dicts, lists, strings and numbers") from None
    return full


def derived_metadata(params: Sequence[Mapping[str, Any]],
                     signatures: Any) -> dict[str, Any]:
    """symbol_bounds, memory and kv_cache, as the entry signatures and the params imply."""
    import numpy as np

    bounds: dict[str, int] = {}
    workspace, kv = 0, {}
    for sig in signatures:
        bounds.update(sig.get("symbol_bounds", {}))
        workspace = max(workspace, int(sig.get("workspace_bytes", 0)))
        for arg in sig.get("args", []):
            if arg.get("role") == "kv_cache":
                kv[arg["name"]] = {"shape": arg["shape"], "dtype": arg["dtype"]}
    params_bytes = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                       for p in params)
    kv_bytes = sum(int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize
                   for a in kv.values())
    return {"symbol_bounds": bounds, "kv_cache": kv,
            "memory": {"params_bytes": params_bytes, "workspace_bytes": workspace,
                       "kv_cache_bytes": kv_bytes}}


def metadata_functions(metadata: Mapping[str, Any]) -> dict[str, tirx.PrimFunc]:
    """Two PrimFuncs that hand out the metadata JSON (a constant string in the library)."""
    text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=True)
    nbytes = len(text)
    size_func = tirx.PrimFunc([], tirx.Return(tirx.IntImm("int64", nbytes)),
                              ret_type=tvm.ir.PrimType("int64"))
    length = tirx.Var("n", "int64")
    out = tirx.decl_buffer((length,), "uint8", name="out")
    check = tirx.AssertStmt(length >= nbytes, tvm.ir.StringImm("ValueError"), [
        tvm.ir.StringImm(f"{METADATA_FUNC}: the output buffer must hold {nbytes} bytes")])
    copy = tirx.Evaluate(tirx.call_extern("handle", "memcpy", out.data, tvm.ir.StringImm(text),
                                          tirx.IntImm("int64", nbytes)))
    copy_func = tirx.PrimFunc([out], tirx.SeqStmt([check, copy]))
    return {METADATA_SIZE_FUNC: size_func.with_attr("global_symbol", METADATA_SIZE_FUNC),
            METADATA_FUNC: copy_func.with_attr("global_symbol", METADATA_FUNC)}


def _with_prefix(module: tvm.IRModule, prefix: str) -> tvm.IRModule:
    """System-library build: every symbol gets `prefix`, including call_cpacked targets."""
    renamed = {}
    for func in module.functions.values():
        name = prefix + _name_of(func)
        renamed[name] = _prefix_calls(func, prefix).with_attr("global_symbol", name)
    return tvm.IRModule(renamed).with_attr("system_lib_prefix", prefix)


def _prefix_calls(func: tirx.PrimFunc, prefix: str) -> tirx.PrimFunc:
    body = func.body
    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    changed = []
    for stmt in stmts:
        call = stmt.value if isinstance(stmt, tirx.Evaluate) else None
        if call is not None and isinstance(call, tvm.ir.expr.Call) and \
                call.op.name == "tirx.tvm_call_cpacked":
            callee = tvm.ir.StringImm(prefix + str(call.args[0].value))
            stmt = tirx.Evaluate(tirx.call_cpacked(callee, *call.args[1:]))
        changed.append(stmt)
    return func.with_body(tirx.SeqStmt(changed) if len(changed) > 1 else changed[0])


def _export(executable, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial-{os.getpid()}{output.suffix}")
    try:
        executable.export_library(str(partial))
        os.replace(partial, output)
    except (RuntimeError, OSError) as err:
        raise MlccError(STAGE, f"writing {output} failed: {str(err).splitlines()[-1]}; for .so "
                        "a host C compiler (cc/g++) must be installed, or build a .tar") from None
    finally:
        if partial.exists():
            partial.unlink()
