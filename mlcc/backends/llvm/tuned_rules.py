"""The tuned LLVM kernels as a kernel rule of the fused-op lowering (codegen.py).

`codegen.kernel_source(spec, name, fast, rules)` asks each rule for a kernel's TVMScript text
before it falls back to the portable kernels. `tuned_rule` answers for the ops where the tuned
generators differ most: `linear` and `q_linear` (GEMV for one row, tiled GEMM with a per-block
dequantized tile for a chunk), with the activations' dtype or float32 as the result dtype, and
returns None for everything else and at O0 (`fast=False`).

    from mlcc.backends.llvm.tuned_rules import tuned_rule
    codegen.build(module, output, metadata, host, fast, prefix, log, rules=[tuned_rule])

Numerics: products accumulate in float32 like the portable kernels, but a quantized weight is
not rounded through the scale dtype before the multiply, so q4f16 results differ from the
interpreter by float16 rounding at most.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

from mlcc.backends.entry import is_buffer
from mlcc.backends.llvm import linear as L

SYMBOLIC_DTYPE = "int64"


def _dim(d: Any) -> int | str:
    """An IR dim (int or Sym) as a kernel extent."""
    return d if isinstance(d, int) else d.name


def tuned_kernel(spec: Any, name: str, prefetch: bool = True) -> tirx.PrimFunc | None:
    """The tuned PrimFunc for a `plan.KernelSpec`, or None when there is none; `prefetch`
    False leaves the decode GEMV's software prefetch out (the `cpu_prefetch` knob)."""
    if spec.op not in ("linear", "q_linear") or len(spec.inputs[0][0]) != 2:
        return None
    (x_shape, x_dtype), (out_shape, out_dtype) = spec.inputs[0], spec.outputs[0]
    # A float16 model's output projection writes float32 logits (out_dtype="float32").
    if out_dtype not in (x_dtype, "float32") or len(out_shape) != 2:
        return None
    rows, k = _dim(x_shape[0]), x_shape[1]
    if spec.op == "linear":
        (n_out, _), w_dtype = spec.inputs[1]
        return L.linear(name, rows, k, n_out, x_dtype, bias=len(spec.inputs) == 3,
                        weight_dtype=w_dtype, out_dtype=out_dtype,
                        prefetch_blocks=L.PREFETCH_BLOCKS if prefetch else 0)
    bits, group = spec.attr("bits"), spec.attr("group_size")
    if spec.attr("in_features") != k:
        return None
    return L.linear_q(name, rows, k, spec.inputs[1][0][0], bits, group, x_dtype,
                      bias=len(spec.inputs) == 4, scale_dtype=spec.inputs[2][1],
                      out_dtype=out_dtype,
                      prefetch_blocks=L.PREFETCH_BLOCKS if prefetch else 0)


def tuned_rule(spec: Any, name: str, fast: bool, prefetch: bool = True) -> str | None:
    """KernelRule for codegen.kernel_source: TVMScript text of the tuned kernel, or None."""
    if not fast:
        return None
    func = tuned_kernel(spec, name, prefetch)
    return None if func is None else primfunc_text(func, name)


def tuned_rule_without_prefetch(spec: Any, name: str, fast: bool) -> str | None:
    """`tuned_rule` with the decode GEMV's software prefetch left out."""
    return tuned_rule(spec, name, fast, prefetch=False)


def primfunc_text(func: tirx.PrimFunc, name: str) -> str:
    """TVMScript of `func` that parses on its own: handles in the signature, symbolic dims
    declared in the body and buffers matched there (the printer puts symbols at module level,
    which a library text that is split per function would lose)."""
    lines = func.script().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("def "))
    decorator, body = lines[at - 1], lines[at + 1:]
    args, decls, symbols = [], [], []
    for param in func.params:
        if not is_buffer(param):
            args.append(f"{param.name}: T.{param.dtype}")
            continue
        args.append(f"{param.name}_h: T.handle")
        dims = []
        for d in param.shape:
            if isinstance(d, tirx.Var):
                if d.name not in symbols:
                    symbols.append(d.name)
                dims.append(d.name)
            else:
                dims.append(str(int(d)))
        shape = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
        decls.append(f'    {param.name} = T.match_buffer({param.name}_h, {shape}, '
                     f'"{param.dtype}")')
    header = [decorator, f"def {name}({', '.join(args)}):"]
    header += [f"    {s} = T.{SYMBOLIC_DTYPE}()" for s in symbols]
    attr_line = [line for line in body[:1] if line.strip().startswith("T.func_attr")]
    rest = body[len(attr_line):]
    return "\n".join(header[:2] + attr_line + header[2:] + decls + rest)
