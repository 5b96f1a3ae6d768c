"""Assemble the CPU library: kernels + one host entry per model function + metadata, then build.

The source of the whole library is TVMScript text: one PrimFunc per distinct kernel (specs that
are equal share a kernel), one entry PrimFunc per model function that binds its arguments,
carves each intermediate out of the workspace by pointer, and calls the kernels in order with
`T.call_cpacked`, and two functions that hand out the metadata JSON
(`mlcc_metadata_nbytes() -> int64`, `mlcc_metadata(out: uint8[n])`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mlcc import ir
from mlcc.backends.llvm.attention import gen_qkv_attention
from mlcc.backends.llvm.fallback import GENERATORS, Emitter, shape_text
from mlcc.backends.llvm.moe import MOE_GENERATORS
from mlcc.backends.output import write_library
from mlcc.backends.plan import (
    CCL_FUNCTIONS,
    BufferRef,
    EntryPlan,
    KernelSpec,
    plan_entry,
    with_tensor_parallel,
)
from mlcc.ir.types import Sym

KernelRule = Callable[[KernelSpec, str, bool], "str | None"]
RUNTIME_ARGS = ("tokens", "seq_info", "page_table", "kv_pool", "logits", "workspace")
DL_DATA, DL_BYTE_OFFSET = 1, 8  # tvm_struct_get fields of a DLTensor


def fallback_rule(spec: KernelSpec, name: str, fast: bool) -> str:
    if spec.op == "qkv_attention":
        return gen_qkv_attention(spec, name, fast)
    if spec.op in MOE_GENERATORS:
        return MOE_GENERATORS[spec.op](spec, name, fast)
    return GENERATORS[spec.op](spec, name, fast)


def kernel_source(spec: KernelSpec, name: str, fast: bool, rules: list[KernelRule]) -> str:
    """The first rule that returns source wins; the fallback always applies."""
    for rule in rules:
        text = rule(spec, name, fast)
        if text is not None:
            return text
    return fallback_rule(spec, name, fast)


def _ident(text: str) -> str:
    return re.sub(r"\W", "_", text)


def entry_source(plan: EntryPlan, kernel_names: dict[KernelSpec, str], prefix: str = "") -> str:
    em = Emitter()
    args = ", ".join(f"a{i}: T.handle" for i in range(len(plan.args)))
    em(f"@T.prim_func\ndef {prefix}{plan.name}({args}):")
    em.depth = 1
    em(f'T.func_attr({{"global_symbol": "{prefix}{plan.name}"}})')
    for sym in plan.symbols:
        em(f"{sym} = T.int64()")
    var_of: dict[tuple, str] = {("arg", ref.arg): f"b{i}" for i, ref in enumerate(plan.args)}
    for i, ref in enumerate(plan.args):  # checked bindings must come first
        if ref.arg in RUNTIME_ARGS:
            em(f'b{i} = T.match_buffer(a{i}, {shape_text(ref.shape)}, "{ref.dtype}")')
    for i, ref in enumerate(plan.args):
        var = f"b{i}"
        if ref.arg not in RUNTIME_ARGS:
            # Weights are bound unchecked: the runtime checks them once at load time, and a
            # checked binding per argument makes LLVM's code generation time grow
            # quadratically with the number of parameters (a 7B Llama has 291).
            data = (f"T.handle_add_byte_offset(T.tvm_struct_get(a{i}, 0, {DL_DATA}, \"handle\"), "
                    f"T.tvm_struct_get(a{i}, 0, {DL_BYTE_OFFSET}, \"int64\"))")
            em(f'{var} = T.decl_buffer({shape_text(ref.shape)}, "{ref.dtype}", data={data})')
    ws = var_of[("arg", "workspace")]
    views: dict[tuple, str] = {}

    def buffer_var(ref: BufferRef) -> str:
        if ref.source == "arg":
            key = ("arg", ref.arg, ref.shape, ref.dtype)
            base = var_of[("arg", ref.arg)]
            arg_ref = next(a for a in plan.args if a.arg == ref.arg)
            if (arg_ref.shape, arg_ref.dtype) == (ref.shape, ref.dtype) and not any(ref.index):
                return base
            key += (ref.index,)
            index = ", ".join(f"T.int64({i})" for i in ref.index) if ref.index else "T.int64(0)"
            pointer = f"T.address_of({base}[{index}])" if ref.index else f"{base}.data"
        else:
            key = ("ws", ref.offset, ref.shape, ref.dtype)
            pointer = f"T.address_of({ws}[T.int64({ref.offset})])"
        if key not in views:
            views[key] = f"v{len(views)}"
            em(f'{views[key]} = T.decl_buffer({shape_text(ref.shape)}, "{ref.dtype}", '
               f"data={pointer})")
        return views[key]

    for call in plan.calls:
        if call.spec.op in CCL_FUNCTIONS:
            em(collective_call(call.spec.op, [buffer_var(b) for b in call.buffers],
                               call.buffers[0]))
            continue
        names = ", ".join(buffer_var(b) for b in call.buffers)
        em(f'T.evaluate(T.call_cpacked("{kernel_names[call.spec]}", {names}))')
    return em.text()


def collective_call(op: str, names: list[str], src: BufferRef) -> str:
    """A call of the runtime's collective function (a global packed function, looked up by
    name when first called) on the raw pointers of source and destination."""
    count = " * ".join(d.name if isinstance(d, Sym) else f"T.int64({d})" for d in src.shape)
    return (f'T.evaluate(T.call_packed("{CCL_FUNCTIONS[op]}", {names[0]}.data, {names[1]}.data, '
            f'{count or "T.int64(1)"}, "{src.dtype}"))')


def metadata_source(metadata: dict, prefix: str = "") -> str:
    text = json.dumps(metadata, separators=(",", ":"), sort_keys=False)
    nbytes = len(text.encode())
    return "\n".join([
        "@T.prim_func",
        f"def {prefix}mlcc_metadata_nbytes() -> T.int64:",
        f'    T.func_attr({{"global_symbol": "{prefix}mlcc_metadata_nbytes"}})',
        f"    return T.int64({nbytes})",
        "",
        "@T.prim_func",
        f"def {prefix}mlcc_metadata(out_h: T.handle):",
        f'    T.func_attr({{"global_symbol": "{prefix}mlcc_metadata"}})',
        f'    out = T.match_buffer(out_h, ({nbytes},), "uint8")',
        f'    T.evaluate(T.call_extern("handle", "memcpy", out.data, {text!r}, T.int64({nbytes})))',
    ])


def library_source(module: ir.Module, metadata: dict, fast: bool,
                   rules: list[KernelRule] | None = None,
                   prefix: str = "") -> tuple[str, dict[str, int]]:
    """TVMScript of the whole library, and how many kernels each op got (for the log).

    Every exported symbol starts with `prefix` (a system library's symbol prefix)."""
    metadata = with_tensor_parallel(module, metadata)
    plans = [plan_entry(fn, module) for fn in module.functions]
    kernel_names: dict[KernelSpec, str] = {}
    for plan in plans:
        for call in plan.calls:
            if call.spec not in kernel_names and call.spec.op not in CCL_FUNCTIONS:
                kernel_names[call.spec] = f"{prefix}k{len(kernel_names)}_{call.spec.op}"
    parts = ["# from tvm.script import ir as I", "# from tvm.script import tirx as T", ""]
    for spec, name in kernel_names.items():
        parts += [kernel_source(spec, name, fast, rules or []), ""]
    for plan in plans:
        parts += [entry_source(plan, kernel_names, prefix), ""]
    parts.append(metadata_source(metadata, prefix))
    counts: dict[str, int] = {}
    for spec in kernel_names:
        counts[spec.op] = counts.get(spec.op, 0) + 1
    return "\n".join(parts) + "\n", counts


def _parse_deep(text: str):
    """Parse one PrimFunc. An entry declares a buffer per weight and per workspace view, and the
    TVMScript parser recurses once per declaration (a 2.7B model has ~950): parse in a thread
    with a large stack and a raised recursion limit instead of overflowing the main stack."""
    import threading

    import tvm.script

    result: dict = {}

    def work() -> None:
        try:
            result["func"] = tvm.script.from_source(text)
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    old_limit, old_stack = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(max(old_limit, 200_000))
    threading.stack_size(1 << 30)
    try:
        worker = threading.Thread(target=work, name="mlcc-parse")
        worker.start()
        worker.join()
    finally:
        threading.stack_size(old_stack)
        sys.setrecursionlimit(old_limit)
    if "error" in result:
        raise result["error"]
    return result["func"]


def parse_functions(source: str) -> tvm.IRModule:  # noqa: F821
    """Parse the library text into an IRModule (one PrimFunc per top-level definition)."""
    import tvm

    funcs = {}
    chunks = re.split(r"\n(?=@T\.prim_func)", source)
    for chunk in chunks:
        if "@T.prim_func" not in chunk:
            continue
        func = _parse_deep(chunk[chunk.index("@T.prim_func"):])
        funcs[func.attrs["global_symbol"]] = func
    return tvm.IRModule(funcs)


def llvm_target(host: str | None):
    """All cores, and the host CPU's features (AVX, F16C) unless cross-compiling."""
    from mlcc.backends.build import make_target

    return make_target("cpu", host)


def build(module: ir.Module, output: Path, metadata: dict, host: str | None, fast: bool,
          system_lib_prefix: str | None, log: Callable[[str], None],
          rules: list[KernelRule] | None = None) -> dict[str, int]:
    """Build `module` into `output` (.so or .tar), written under a temporary name first."""
    import tvm

    source, counts = library_source(module, metadata, fast, rules, system_lib_prefix or "")
    log("kernels: " + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    mod = parse_functions(source)
    if system_lib_prefix:
        mod = mod.with_attr("system_lib_prefix", system_lib_prefix)
    executable = tvm.compile(mod, target=llvm_target(host))
    write_library(output, lambda path: executable.export_library(str(path)))
    return counts
