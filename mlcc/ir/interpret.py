"""The NumPy interpreter: runs any function of a module. Its results define what the IR means.

Inputs are bound positionally or by name; symbolic dims take their values from the input
shapes (a symbol bound twice must agree). A KV-cache input takes a `KVCacheState`, whose length
advances when the function returns; in a function with the attribute `batched_kv` it takes a
list of states, one per row of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mlcc.ir.core import Function, Module
from mlcc.ir.kv import KVCacheState
from mlcc.ir.registry import EvalContext, get_op
from mlcc.ir.types import KVCacheType, Sym, TensorType, numpy_dtype


class InterpretError(Exception):
    pass


def _bind_input(name: str, t: TensorType, array: Any, bindings: dict[str, int]) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.dtype(numpy_dtype(t.dtype)):
        raise InterpretError(f"input %{name}: expected dtype {t.dtype}, got {array.dtype}")
    if array.ndim != t.rank:
        raise InterpretError(f"input %{name}: expected {t}, got shape {array.shape}")
    for dim, size in zip(t.shape, array.shape):
        if isinstance(dim, Sym):
            if bindings.setdefault(dim.name, size) != size:
                raise InterpretError(f"input %{name}: symbol {dim.name} is {bindings[dim.name]} "
                                     f"elsewhere but {size} here")
        elif dim != size:
            raise InterpretError(f"input %{name}: expected {t}, got shape {array.shape}")
    return array


def _check_param(fn: Function, name: str, t: TensorType, params: Mapping[str, Any]) -> np.ndarray:
    if name not in params:
        raise InterpretError(f"function {fn.name!r} needs parameter @{name} ({t}); not given")
    array = np.asarray(params[name])
    expected = tuple(t.shape)
    if array.dtype != np.dtype(numpy_dtype(t.dtype)) or array.shape != expected:
        raise InterpretError(f"parameter @{name}: expected {t}, got {array.dtype}{list(array.shape)}")
    return array


def interpret(module: Module, fn_name: str, args: Sequence[Any] | Mapping[str, Any],
              params: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """Run `module.fn_name` on `args` with parameter arrays `params`; returns its outputs."""
    fn = module.function(fn_name)
    if isinstance(args, Mapping):
        missing = [v.name for v in fn.inputs if v.name not in args]
        if missing:
            raise InterpretError(f"function {fn.name!r}: missing inputs {missing}")
        args = [args[v.name] for v in fn.inputs]
    if len(args) != len(fn.inputs):
        raise InterpretError(f"function {fn.name!r} takes {len(fn.inputs)} inputs, got {len(args)}")
    bindings: dict[str, int] = {}
    env: dict[int, Any] = {}
    caches: list[KVCacheState] = []
    for value, arg in zip(fn.inputs, args):
        if isinstance(value.type, KVCacheType):
            states = list(arg) if fn.attrs.get("batched_kv") else [arg]
            for state in states:
                if not isinstance(state, KVCacheState) or state.type != value.type:
                    raise InterpretError(f"input %{value.name}: expected a KVCacheState of "
                                         f"{value.type}" + (" per row" if len(states) > 1 else ""))
            env[id(value)] = arg
            caches.extend(states)
        else:
            env[id(value)] = _bind_input(value.name, value.type, arg, bindings)
    ctx = EvalContext(bindings, {})
    for node in fn.nodes:
        inputs = []
        for value in node.inputs:
            if value.kind == "param":
                inputs.append(_check_param(fn, value.name, value.type, params))
            else:
                inputs.append(env[id(value)])
        try:
            results = get_op(node.op).reference(ctx, inputs, node.attrs)
        except (ValueError, IndexError) as err:
            raise InterpretError(f"{node.op} defining {node.outputs[0].ref}: {err}") from err
        for value, result in zip(node.outputs, results):
            env[id(value)] = result
    for cache in caches:
        cache.commit()
    return tuple(env[id(v)] if v.kind != "param" else params[v.name] for v in fn.outputs)
