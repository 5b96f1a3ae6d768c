"""The verifier: checks a module and explains what is wrong, where, with the neighbouring nodes.

Rules checked: every op is registered; attribute names and types; input counts; values are
defined before use and defined once; parameters referenced by functions exist with the same
type; symbols in node types are bound by the function's inputs; each node's output types equal
what its op's type rule infers; op-specific verifier rules; outputs are defined values.
"""

from __future__ import annotations

from mlcc.ir.core import Function, Module, Node
from mlcc.ir.printer import format_node
from mlcc.ir.registry import OPS, TypeRuleError
from mlcc.ir.types import Sym, TensorType


class VerifyError(Exception):
    """A malformed module. The message names the function, the node, the rule and the values."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _context(fn: Function, index: int) -> str:
    lines = []
    for i in range(max(0, index - 2), min(len(fn.nodes), index + 3)):
        marker = ">>" if i == index else "  "
        lines.append(f"  {marker} {format_node(fn.nodes[i]) if fn.nodes[i].op in OPS else fn.nodes[i].op}")
    return "\n".join(lines)


def _fail(fn: Function, index: int, rule: str, message: str) -> VerifyError:
    node = fn.nodes[index]
    return VerifyError(
        rule,
        f"in function {fn.name!r}, node {index} ({node.op} defining "
        f"{', '.join(v.ref for v in node.outputs) or 'nothing'}): [{rule}] {message}\n"
        f"{_context(fn, index)}",
    )


def _check_symbols(fn: Function, index: int, node: Node, bound: set[str]) -> None:
    for value in node.outputs:
        if isinstance(value.type, TensorType):
            for dim in value.type.shape:
                if isinstance(dim, Sym) and dim.name not in bound:
                    raise _fail(fn, index, "unknown-symbol",
                                f"{value.ref}: {value.type} uses symbol {dim.name!r}, which no "
                                f"input of the function binds (bound: {sorted(bound) or 'none'})")


def verify_function(fn: Function, module: Module | None = None) -> None:
    defined: set[int] = set()
    names: set[str] = set()
    bound = {s.name for s in fn.symbols}
    params = {p.name: p for p in module.params} if module is not None else None
    for value in fn.inputs:
        if value.name in names:
            raise VerifyError("single-definition", f"in function {fn.name!r}: input "
                              f"{value.ref} is declared twice")
        names.add(value.name)
        defined.add(id(value))
    for index, node in enumerate(fn.nodes):
        opdef = OPS.get(node.op)
        if opdef is None:
            raise _fail(fn, index, "unknown-op", f"op {node.op!r} is not registered")
        lo, hi = opdef.num_inputs
        if len(node.inputs) < lo or (hi is not None and len(node.inputs) > hi):
            raise _fail(fn, index, "arity", f"{node.op} takes {lo}..{hi or 'n'} inputs, "
                        f"got {len(node.inputs)}")
        for value in node.inputs:
            if value.kind == "param":
                if params is not None and value.name not in params:
                    raise _fail(fn, index, "unknown-param",
                                f"parameter {value.ref} is not declared by the module")
                if params is not None and params[value.name].type != value.type:
                    raise _fail(fn, index, "param-type",
                                f"{value.ref} is used as {value.type} but declared as "
                                f"{params[value.name].type}")
            elif id(value) not in defined:
                raise _fail(fn, index, "use-before-def",
                            f"{value.ref} is used before it is defined")
        try:
            attrs = opdef.complete_attrs(node.attrs)
            if dict(attrs) != dict(node.attrs):
                missing = sorted(set(attrs) - set(node.attrs))
                raise TypeRuleError(f"attributes {missing} are not set")
            types = [v.type for v in node.inputs]
            inferred = opdef.infer(types, attrs)
            if opdef.verify is not None:
                opdef.verify(types, attrs)
        except TypeRuleError as err:
            args = ", ".join(f"{v.ref}: {v.type}" for v in node.inputs)
            raise _fail(fn, index, "type-rule", f"{node.op}({args}): {err}") from None
        declared = tuple(v.type for v in node.outputs)
        if tuple(inferred) != declared:
            raise _fail(fn, index, "output-type",
                        f"declared {', '.join(map(str, declared))} but the {node.op} rule gives "
                        f"{', '.join(map(str, inferred))}")
        _check_symbols(fn, index, node, bound)
        for value in node.outputs:
            if value.name in names or id(value) in defined:
                raise _fail(fn, index, "single-definition", f"{value.ref} is defined twice")
            names.add(value.name)
            defined.add(id(value))
    for value in fn.outputs:
        if value.kind != "param" and id(value) not in defined:
            raise VerifyError("undefined-output", f"in function {fn.name!r}: output "
                              f"{value.ref} is never defined")


def verify(module: Module) -> Module:
    """Check every function of `module`; returns it unchanged or raises VerifyError."""
    seen: set[str] = set()
    for p in module.params:
        if p.name in seen:
            raise VerifyError("single-definition", f"parameter @{p.name} is declared twice")
        seen.add(p.name)
    fn_names = [fn.name for fn in module.functions]
    if len(set(fn_names)) != len(fn_names):
        raise VerifyError("single-definition", f"duplicate function names in {fn_names}")
    for fn in module.functions:
        verify_function(fn, module)
    return module
