"""Pass infrastructure: named passes with options, the pattern-rewrite driver, the runner.

A pass is a frozen dataclass whose fields are its options, with a `name` and
`run(module) -> module`. Its docstring says what it requires and what it guarantees. The runner
verifies the module after every pass and, with a dump folder, writes the IR after each pass as
`NN-name.txt`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mlcc.ir import Function, Module, Node, Value, print_module, verify
from mlcc.ir.registry import get_op


class Pass:
    """Base of all passes (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = "pass"

    def run(self, module: Module) -> Module:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PassTiming:
    name: str
    seconds: float


@dataclass
class PipelineResult:
    module: Module
    timings: list[PassTiming] = field(default_factory=list)


def run_passes(module: Module, passes: Sequence[Pass], dump_dir: Path | None = None,
               check: bool = True, on_pass: Callable[[str], None] | None = None) -> PipelineResult:
    """Run `passes` in order, verifying after each; optionally dump the IR after each pass."""
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-input.txt").write_text(print_module(module))
    timings = []
    for index, p in enumerate(passes, start=1):
        if on_pass is not None:
            on_pass(p.name)
        start = time.perf_counter()
        module = p.run(module)
        if check:
            verify(module)
        timings.append(PassTiming(p.name, time.perf_counter() - start))
        if dump_dir is not None:
            (dump_dir / f"{index:02d}-{p.name}.txt").write_text(print_module(module))
    return PipelineResult(module, timings)


# --- pattern rewriting ----------------------------------------------------------------------

# A rule sees one node and the function's use lists; it returns the nodes replacing it plus a
# value substitution map (old value -> new value), or None when it does not apply. Rules may also
# delete producer nodes by listing them in `remove`.


@dataclass
class Rewrite:
    new_nodes: list[Node]
    replace: dict[int, Value]  # id(old value) -> new value
    remove: list[Node] = field(default_factory=list)


Rule = Callable[[Node, "FunctionView"], "Rewrite | None"]


class FunctionView:
    """Read-only queries a rule needs: producers and users of values."""

    def __init__(self, fn: Function) -> None:
        self.fn = fn
        self.producer: dict[int, Node] = {}
        for node in fn.nodes:
            for value in node.outputs:
                self.producer[id(value)] = node
        self.uses = fn.users()
        self.outputs = {id(v) for v in fn.outputs}

    def single_use(self, value: Value) -> bool:
        return len(self.uses.get(id(value), [])) == 1 and id(value) not in self.outputs

    def producer_of(self, value: Value, op: str | None = None) -> Node | None:
        node = self.producer.get(id(value))
        if node is not None and op is not None and node.op != op:
            return None
        return node


def substitute(nodes: Iterable[Node], replace: dict[int, Value]) -> list[Node]:
    out = []
    for node in nodes:
        if any(id(v) in replace for v in node.inputs):
            node = Node(node.op, tuple(replace.get(id(v), v) for v in node.inputs),
                        node.outputs, node.attrs)
        out.append(node)
    return out


def rewrite_function(fn: Function, rules: Sequence[Rule], max_rounds: int | None = None
                     ) -> Function:
    """Apply rules until none matches; fails loudly if that does not happen in max_rounds
    (default: a few rewrites per node, so a rule that keeps matching its own output is caught
    while an 80-layer model with one rewrite per layer and pattern is not)."""
    if max_rounds is None:
        max_rounds = 100 + 4 * len(fn.nodes)
    for _ in range(max_rounds):
        view = FunctionView(fn)
        for index, node in enumerate(fn.nodes):
            result = None
            for rule in rules:
                result = rule(node, view)
                if result is not None:
                    break
            if result is None:
                continue
            removed = {id(n) for n in result.remove} | {id(node)}
            kept = [n for n in fn.nodes[:index] if id(n) not in removed]
            after = [n for n in fn.nodes[index + 1:] if id(n) not in removed]
            nodes = kept + result.new_nodes + substitute(after, result.replace)
            outputs = tuple(result.replace.get(id(v), v) for v in fn.outputs)
            fn = fn.replace(nodes=tuple(nodes), outputs=outputs)
            break
        else:
            return fn
    raise RuntimeError(f"pattern rewriting of {fn.name!r} did not reach a fixed point in "
                       f"{max_rounds} rounds: a rule keeps matching its own output")


def map_functions(module: Module, fn: Callable[[Function], Function]) -> Module:
    for f in module.functions:
        module = module.with_function(fn(f))
    return module


def has_side_effect(node: Node) -> bool:
    return get_op(node.op).side_effect
