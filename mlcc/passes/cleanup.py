"""Dead-code elimination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.ir import Function, Module
from mlcc.passes.base import Pass, has_side_effect, map_functions


def eliminate_dead_code(fn: Function) -> Function:
    live = {id(v) for v in fn.outputs}
    kept = []
    for node in reversed(fn.nodes):
        if has_side_effect(node) or any(id(v) in live for v in node.outputs):
            kept.append(node)
            live.update(id(v) for v in node.inputs)
    return fn.replace(nodes=tuple(reversed(kept)))


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Removes nodes whose results are never used and that have no side effect.

    Requires: a verified module. Guarantees: every remaining node is used or has a side effect
    (attention writes the KV cache); parameters no function reads are dropped.
    """

    name: ClassVar[str] = "dead_code_elimination"
    drop_unused_params: bool = True

    def run(self, module: Module) -> Module:
        module = map_functions(module, eliminate_dead_code)
        if not self.drop_unused_params:
            return module
        used = {v.name for fn in module.functions for v in fn.params_used()}
        return module.with_params(p for p in module.params if p.name in used)
