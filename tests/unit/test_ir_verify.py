"""The verifier rejects malformed graphs and says which rule, which node, which value, and where.

Each case takes a valid five-node chain and replaces its middle node (index 2, defining %b) with
a broken one, built from Function/Node/Value directly because the builder refuses such graphs.
The message must carry the rule, the node's op and index, the offending value, and the
neighbouring nodes printed around a `>>` marker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mlcc import ir
from mlcc.ir import Function, KVCacheType, Module, Node, Param, Sym, TensorType, Value

SEQ = Sym("seq_len")
F32_SEQ_4 = TensorType("float32", (SEQ, 4))


@dataclass
class Chain:
    """The pieces of the valid chain, so a case can rebuild it with one node replaced."""

    x: Value
    y5: Value
    z16: Value
    cache: Value
    norm: Param
    h: Value
    a: Value
    b: Value
    c: Value
    d: Value

    def nodes(self, middle: Node) -> list[Node]:
        return [
            Node("rms_norm", (self.x, self.norm.value), (self.h,),
                 {"eps": 1e-5, "weight_offset": 0.0}),
            Node("silu", (self.h,), (self.a,)),
            middle,
            Node("add", (self.b, self.x), (self.c,)),
            Node("scale", (self.c,), (self.d,), {"factor": 0.5}),
        ]

    def function(self, middle: Node, outputs: tuple[Value, ...] | None = None) -> Function:
        inputs = (self.x, self.y5, self.z16, self.cache)
        return Function("prefill", inputs, tuple(self.nodes(middle)), outputs or (self.d,))

    def module(self, middle: Node, params: tuple[Param, ...] | None = None) -> Module:
        return Module("m", (self.function(middle),), params if params is not None else
                      (self.norm,))


def make_chain() -> Chain:
    cache_type = KVCacheType(1, 1, 4, "float32", capacity=16)
    return Chain(
        x=Value("x", F32_SEQ_4, "input"),
        y5=Value("y5", TensorType("float32", (SEQ, 5)), "input"),
        z16=Value("z16", TensorType("float16", (SEQ, 4)), "input"),
        cache=Value("kv_cache", cache_type, "input"),
        norm=Param("norm.weight", TensorType("float32", (4,))),
        h=Value("h", F32_SEQ_4), a=Value("a", F32_SEQ_4), b=Value("b", F32_SEQ_4),
        c=Value("c", F32_SEQ_4), d=Value("d", F32_SEQ_4),
    )


def good_middle(ch: Chain) -> Node:
    return Node("mul", (ch.a, ch.h), (ch.b,))


def verify_error(module: Module) -> ir.VerifyError:
    with pytest.raises(ir.VerifyError) as info:
        ir.verify(module)
    return info.value


def test_the_unbroken_chain_verifies():
    ch = make_chain()
    module = ch.module(good_middle(ch))
    assert ir.verify(module) is module


@dataclass(frozen=True)
class Case:
    kind: str
    rule: str
    middle: Callable[[Chain], Node]
    says: tuple[str, ...]  # parts the message must contain besides the node and the context


def _b(dtype: str = "float32", *shape: Any) -> Value:
    return Value("b", TensorType(dtype, shape or (SEQ, 4)))


CASES = [
    Case("wrong shapes", "type-rule", lambda ch: Node("mul", (ch.a, ch.y5), (ch.b,)),
         ("%y5: f32[seq_len, 5]", "shapes [seq_len, 4] and [seq_len, 5] do not broadcast")),
    Case("dtype mismatch", "type-rule", lambda ch: Node("mul", (ch.a, ch.z16), (ch.b,)),
         ("%z16: f16[seq_len, 4]", "dtype mismatch: lhs and rhs")),
    Case("use before definition", "use-before-def",
         lambda ch: Node("mul", (ch.a, ch.c), (ch.b,)), ("%c is used before it is defined",)),
    Case("value of another function", "use-before-def",
         lambda ch: Node("mul", (ch.a, Value("x", F32_SEQ_4, "input")), (ch.b,)),
         ("%x is used before it is defined",)),
    Case("unknown symbol", "unknown-symbol",
         lambda ch: Node("positions", (ch.cache,), (_b("int32", Sym("batch")),),
                         {"length": Sym("batch"), "batched": False}),
         ("%b: i32[batch] uses symbol 'batch'", "bound: ['seq_len']")),
    Case("wrong attribute type", "type-rule",
         lambda ch: Node("scale", (ch.a,), (ch.b,), {"factor": 2}),
         ("attribute factor=2 must be float, got int",)),
    Case("bool where an int is wanted", "type-rule",
         lambda ch: Node("softmax", (ch.a,), (ch.b,), {"axis": True}),
         ("attribute axis=True must be int, got bool",)),
    Case("unknown attribute", "type-rule",
         lambda ch: Node("silu", (ch.a,), (ch.b,), {"alpha": 1.0}),
         ("unknown attribute 'alpha' (known: none)",)),
    Case("missing required attribute", "type-rule",
         lambda ch: Node("rms_norm", (ch.a, ch.norm.value), (ch.b,)),
         ("missing required attribute 'eps'",)),
    Case("missing defaulted attribute", "type-rule",
         lambda ch: Node("rms_norm", (ch.a, ch.norm.value), (ch.b,), {"eps": 1e-6}),
         ("attributes ['weight_offset'] are not set",)),
    Case("op-specific rule", "type-rule",
         lambda ch: Node("gelu", (ch.a,), (ch.b,), {"approximate": "fast"}),
         ("approximate must be 'none' or 'tanh', got 'fast'",)),
    Case("unknown op", "unknown-op", lambda ch: Node("frobnicate", (ch.a,), (ch.b,)),
         ("op 'frobnicate' is not registered",)),
    Case("too few inputs", "arity", lambda ch: Node("add", (ch.a,), (ch.b,)),
         ("add takes 2..2 inputs, got 1",)),
    Case("too many inputs", "arity", lambda ch: Node("silu", (ch.a, ch.h), (ch.b,)),
         ("silu takes 1..1 inputs, got 2",)),
    Case("declared shape differs from the rule", "output-type",
         lambda ch: Node("mul", (ch.a, ch.h), (_b("float32", SEQ, 8),)),
         ("declared f32[seq_len, 8] but the mul rule gives f32[seq_len, 4]",)),
    Case("declared dtype differs from the rule", "output-type",
         lambda ch: Node("mul", (ch.a, ch.h), (_b("float16"),)),
         ("declared f16[seq_len, 4] but the mul rule gives f32[seq_len, 4]",)),
    Case("declared output count differs from the rule", "output-type",
         lambda ch: Node("split", (ch.a,), (ch.b,), {"sizes": (2, 2), "axis": -1}),
         ("declared f32[seq_len, 4] but the split rule gives f32[seq_len, 2], f32[seq_len, 2]",)),
    Case("undeclared parameter", "unknown-param",
         lambda ch: Node("mul", (ch.a, Value("ghost.weight", TensorType("float32", (4,)), "param")),
                         (ch.b,)),
         ("parameter @ghost.weight is not declared by the module",)),
    Case("parameter used with another type", "param-type",
         lambda ch: Node("mul", (ch.a, Value("norm.weight", TensorType("float32", (1,)), "param")),
                         (ch.b,)),
         ("@norm.weight is used as f32[1] but declared as f32[4]",)),
    Case("value defined twice (same value)", "single-definition",
         lambda ch: Node("mul", (ch.a, ch.h), (ch.a,)), ("%a is defined twice",)),
    Case("value defined twice (same name)", "single-definition",
         lambda ch: Node("mul", (ch.a, ch.h), (Value("h", F32_SEQ_4),)), ("%h is defined twice",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_malformed_node_is_rejected_with_rule_node_value_and_context(case: Case):
    ch = make_chain()
    middle = case.middle(ch)
    err = verify_error(ch.module(middle))
    message = str(err)
    assert err.rule == case.rule, message
    defined = ", ".join(v.ref for v in middle.outputs)
    assert message.startswith(
        f"in function 'prefill', node 2 ({middle.op} defining {defined}): [{case.rule}] "), message
    for part in case.says:
        assert part in message, f"{part!r} not in:\n{message}"
    context = message.splitlines()[1:]
    assert len(context) == 5, message  # nodes 0..4: two neighbours on each side of node 2
    assert context[0] == "     %h = rms_norm(%x, @norm.weight, eps=1e-05) " \
                         ": f32[seq_len, 4]"
    assert context[1] == "     %a = silu(%h) : f32[seq_len, 4]"
    assert context[2].startswith("  >> ") and middle.op in context[2]
    assert context[3] == "     %c = add(%b, %x) : f32[seq_len, 4]"
    assert context[4] == "     %d = scale(%c, factor=0.5) : f32[seq_len, 4]"


def test_context_is_clipped_at_the_start_of_the_function():
    ch = make_chain()
    nodes = ch.nodes(good_middle(ch))
    nodes[0] = Node("rms_norm", (ch.x, ch.norm.value), (ch.h,), {"eps": -1.0,
                                                                   "weight_offset": 0.0})
    fn = Function("prefill", (ch.x, ch.y5, ch.z16, ch.cache), tuple(nodes), (ch.d,))
    err = verify_error(Module("m", (fn,), (ch.norm,)))
    assert err.rule == "type-rule"
    assert "node 0 (rms_norm defining %h)" in str(err) and "eps must be > 0, got -1.0" in str(err)
    context = str(err).splitlines()[1:]
    assert len(context) == 3 and context[0].startswith("  >> %h = rms_norm(")


def test_undefined_output_names_the_function_and_the_value():
    ch = make_chain()
    stray = Value("logits", TensorType("float32", (4,)))
    fn = ch.function(good_middle(ch), outputs=(ch.d, stray))
    err = verify_error(Module("m", (fn,), (ch.norm,)))
    assert err.rule == "undefined-output"
    assert str(err) == "in function 'prefill': output %logits is never defined"


def test_input_declared_twice_is_rejected():
    ch = make_chain()
    twin = Value("x", F32_SEQ_4, "input")
    fn = Function("prefill", (ch.x, twin), (), (ch.x,))
    err = verify_error(Module("m", (fn,), ()))
    assert err.rule == "single-definition"
    assert "in function 'prefill': input %x is declared twice" in str(err)


def test_parameter_declared_twice_and_duplicate_functions_are_rejected():
    ch = make_chain()
    fn = ch.function(good_middle(ch))
    err = verify_error(Module("m", (fn,), (ch.norm, ch.norm)))
    assert (err.rule, str(err)) == ("single-definition", "parameter @norm.weight is declared twice")
    err = verify_error(Module("m", (fn, fn), (ch.norm,)))
    assert err.rule == "single-definition" and "['prefill', 'prefill']" in str(err)


def test_unknown_op_among_neighbours_is_shown_by_name():
    ch = make_chain()
    nodes = ch.nodes(good_middle(ch))
    nodes[3] = Node("mystery", (ch.b, ch.x), (ch.c,))
    fn = Function("prefill", (ch.x,), tuple(nodes), (ch.d,))
    err = verify_error(Module("m", (fn,), (ch.norm,)))
    assert err.rule == "unknown-op" and "node 3 (mystery defining %c)" in str(err)
    assert "  >> mystery" in str(err).splitlines()


def test_builder_names_never_collide_with_explicit_names():
    mb = ir.ModuleBuilder("names")
    with mb.function("f") as b:
        x = b.input("x", (3,), "float32")
        y = b.silu(x, name="y.0")  # looks like a name the builder would generate for "y"
        y = b.silu(b.silu(y, name="y"), name="y")
        z = b.silu(y, name="2")  # looks like a generated anonymous name
        for _ in range(4):
            z = b.silu(z)
        b.output(z)
    fn = ir.verify(mb.finish()).function("f")
    names = [v.name for node in fn.nodes for v in node.outputs]
    assert len(set(names)) == len(names) == 8
    assert names[:4] == ["y.0", "y", "y.1", "2"]
