"""Property tests: the shape rules of add/mul, matmul, linear and reshape agree with NumPy.

Shapes hold ints 0..6 and the symbols s, t, u. Binding the symbols to 7, 11 and 13, primes that
no int dim (nor product of int dims) shares a factor with, makes NumPy an exact oracle for the
symbolic rules: under that binding two dims are equal, or a dim is 1, exactly when they are so
symbolically, and two products are equal exactly when their symbolic normal forms are. So a rule
must accept a shape pair iff NumPy accepts it under that binding, and whenever it accepts, NumPy
must agree with the bound result under every binding (here also all ones and a small one).
"""

from __future__ import annotations

from collections import Counter
from math import prod

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcc import ir
from mlcc.ir import Sym, TensorType

SYMS = tuple(Sym(name) for name in ("s", "t", "u"))
GENERIC = {"s": 7, "t": 11, "u": 13}
BINDINGS = (GENERIC, {"s": 1, "t": 1, "u": 1}, {"s": 2, "t": 3, "u": 2})
PROPERTY = settings(max_examples=100, deadline=None)

int_dims = st.one_of(st.just(1), st.integers(0, 6))
any_dims = st.one_of(st.just(1), st.integers(0, 6), st.sampled_from(SYMS))


def f32(shape) -> TensorType:
    return TensorType("float32", tuple(shape))


def rule_shapes(op: str, shapes, **attrs) -> tuple | None:
    """The op's output shapes, or None when its type rule (or verifier rule) refuses."""
    opdef = ir.get_op(op)
    types = [f32(s) for s in shapes]
    try:
        full = opdef.complete_attrs(attrs)
        outs = opdef.infer(types, full)
        if opdef.verify is not None:
            opdef.verify(types, full)
    except ir.TypeRuleError:
        return None
    return tuple(o.shape for o in outs)


def rule_shape(op: str, shapes, **attrs) -> tuple | None:
    outs = rule_shapes(op, shapes, **attrs)
    return None if outs is None else outs[0]


def bind(shape, binding: dict[str, int]) -> tuple[int, ...]:
    return tuple(binding[d.name] if isinstance(d, Sym) else d for d in shape)


def numpy_shape(fn, *shapes) -> tuple[int, ...] | None:
    """NumPy's result shape for fn(zeros(shape), ...), or None when NumPy refuses."""
    try:
        return tuple(fn(*(np.zeros(s, np.float32) for s in shapes)).shape)
    except ValueError:
        return None


def numpy_broadcast(a, b) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def derive(draw, base: list, dims) -> tuple:
    """A shape like `base`: each dim kept, set to 1 or redrawn; some leading dims dropped."""
    shape = []
    for d in base:
        how = draw(st.sampled_from(("keep", "keep", "one", "other")))
        shape.append(d if how == "keep" else 1 if how == "one" else draw(dims))
    return tuple(shape[draw(st.integers(0, len(shape))):])


@st.composite
def broadcast_pairs(draw, dims, max_rank: int = 4):
    base = draw(st.lists(dims, max_size=max_rank))
    return derive(draw, base, dims), derive(draw, base, dims)


# --- broadcasting: add and mul --------------------------------------------------------------


@PROPERTY
@given(broadcast_pairs(int_dims), st.sampled_from(("add", "mul")))
def test_int_broadcasting_equals_numpy(pair, op):
    a, b = pair
    assert rule_shape(op, [a, b]) == numpy_broadcast(a, b)


@PROPERTY
@given(broadcast_pairs(any_dims), st.sampled_from(("add", "mul")))
def test_symbolic_broadcasting_equals_numpy_under_every_binding(pair, op):
    a, b = pair
    got = rule_shape(op, [a, b])
    assert (got is None) == (numpy_broadcast(bind(a, GENERIC), bind(b, GENERIC)) is None)
    if got is not None:
        for binding in BINDINGS:
            assert bind(got, binding) == numpy_broadcast(bind(a, binding), bind(b, binding))


@PROPERTY
@given(st.sampled_from(SYMS), any_dims, st.integers(0, 3))
def test_a_symbol_broadcasts_only_with_itself_or_one(sym, other, lead):
    got = rule_shape("mul", [(sym,), (1,) * lead + (other,)])
    if other == sym or other == 1:
        assert got == (1,) * lead + (sym,)
    else:
        assert got is None


def test_broadcasting_examples_with_symbols():
    s, t = Sym("s"), Sym("t")
    assert rule_shape("add", [(s, 1, 4), (t, 1)]) == (s, t, 4)
    assert rule_shape("add", [(4,), (s, 4)]) == (s, 4)
    assert rule_shape("add", [(1, s), (s, 1)]) == (s, s)
    assert rule_shape("add", [(s,), (t,)]) is None
    assert rule_shape("add", [(s,), (4,)]) is None
    with pytest.raises(ir.TypeRuleError, match=r"shapes \[s\] and \[4\] do not broadcast"):
        ir.get_op("add").infer([f32((s,)), f32((4,))], {})


# --- matmul and linear ----------------------------------------------------------------------


@st.composite
def matmul_pairs(draw, dims):
    batch_a, batch_b = draw(broadcast_pairs(dims, max_rank=2))
    m, k, n = draw(dims), draw(dims), draw(dims)
    k_rhs = draw(st.one_of(st.just(k), dims))
    return batch_a + (m, k), batch_b + (k_rhs, n)


def numpy_matmul(a, b):
    return numpy_shape(np.matmul, a, b)


@PROPERTY
@given(matmul_pairs(int_dims))
def test_int_matmul_equals_numpy(pair):
    a, b = pair
    assert rule_shape("matmul", [a, b]) == numpy_matmul(a, b)


@PROPERTY
@given(matmul_pairs(any_dims))
def test_symbolic_matmul_equals_numpy_under_every_binding(pair):
    a, b = pair
    got = rule_shape("matmul", [a, b])
    assert (got is None) == (numpy_matmul(bind(a, GENERIC), bind(b, GENERIC)) is None)
    if got is not None:
        for binding in BINDINGS:
            assert bind(got, binding) == numpy_matmul(bind(a, binding), bind(b, binding))


def test_matmul_refuses_vectors_that_numpy_would_promote():
    # The IR keeps matrices explicit: a vector operand must be reshaped to [1, k] or [k, 1].
    assert numpy_matmul((3,), (3, 2)) == (2,)
    assert rule_shape("matmul", [(3,), (3, 2)]) is None
    assert rule_shape("matmul", [(2, 3), (3,)]) is None


@st.composite
def linear_operands(draw, dims):
    k, n = draw(dims), draw(dims)
    x = tuple(draw(st.lists(dims, max_size=2))) + (draw(st.one_of(st.just(k), dims)),)
    if draw(st.integers(0, 9)) == 0:
        x = ()  # a scalar has no feature axis
    bias = draw(st.one_of(st.none(), st.just((n,)), st.tuples(dims)))
    return x, (n, k), bias


def numpy_linear(x, w, bias):
    def linear(x, w, *b):
        y = np.matmul(x, w.T)
        return y + b[0] if b else y
    return numpy_shape(linear, x, w, *(() if bias is None else (bias,)))


def linear_rule_shape(x, w, bias):
    return rule_shape("linear", [x, w] if bias is None else [x, w, bias])


@PROPERTY
@given(linear_operands(any_dims))
def test_linear_equals_numpy_x_matmul_weight_t_plus_bias(operands):
    # One difference on purpose: the bias must be exactly [out_features]; a [1] bias that
    # NumPy would broadcast is refused, since no checkpoint stores one.
    x, w, bias = operands
    got = linear_rule_shape(x, w, bias)
    bias_is_exact = bias is None or bias == (w[0],)
    want = numpy_linear(bind(x, GENERIC), bind(w, GENERIC),
                        None if bias is None else bind(bias, GENERIC))
    assert (got is None) == (want is None or not bias_is_exact)
    if got is not None:
        for binding in BINDINGS:
            bound_bias = None if bias is None else bind(bias, binding)
            assert bind(got, binding) == numpy_linear(bind(x, binding), bind(w, binding),
                                                      bound_bias)


def test_linear_weight_must_be_two_dimensional():
    assert rule_shape("linear", [(2, 4), (3, 4)]) == (2, 3)
    assert rule_shape("linear", [(2, 4), (1, 3, 4)]) is None
    assert rule_shape("linear", [(2, 4), (4,)]) is None


# --- reshape --------------------------------------------------------------------------------


def regroup(draw, shape: tuple, dims) -> tuple:
    """A target that often has the same element count: permuted, merged, split or random."""
    how = draw(st.sampled_from(("permute", "merge", "split", "random")))
    target = list(draw(st.permutations(shape)))
    if how == "merge" and len(target) >= 2 and all(isinstance(d, int) for d in target[:2]):
        target[:2] = [target[0] * target[1]]
    elif how == "split":
        ints = [i for i, d in enumerate(target) if isinstance(d, int) and d in (4, 6)]
        if ints:
            i = ints[0]
            target[i:i + 1] = [2, target[i] // 2]
    elif how == "random":
        target = draw(st.lists(dims, max_size=4))
    if draw(st.booleans()):
        target.insert(draw(st.integers(0, len(target))), 1)
    return tuple(target)


@st.composite
def reshape_pairs(draw, dims):
    shape = tuple(draw(st.lists(dims, max_size=4)))
    return shape, regroup(draw, shape, dims)


def numpy_reshape(shape, target):
    return numpy_shape(lambda x: x.reshape(target), shape)


def symbolic_size(shape) -> tuple[int, Counter]:
    """Element count as (int factor, symbol multiset); zero absorbs the symbols."""
    const = prod(d for d in shape if isinstance(d, int))
    if const == 0:
        return 0, Counter()
    return const, Counter(d for d in shape if isinstance(d, Sym))


@PROPERTY
@given(reshape_pairs(int_dims))
def test_int_reshape_equals_numpy(pair):
    shape, target = pair
    assert rule_shape("reshape", [shape], shape=target) == numpy_reshape(shape, target)


@PROPERTY
@given(reshape_pairs(any_dims))
def test_symbolic_reshape_accepts_iff_symbolic_sizes_match(pair):
    shape, target = pair
    got = rule_shape("reshape", [shape], shape=target)
    assert (got is not None) == (symbolic_size(shape) == symbolic_size(target))
    assert (got is None) == (numpy_reshape(bind(shape, GENERIC), bind(target, GENERIC)) is None)
    if got is not None:
        assert got == target
        for binding in BINDINGS:
            bound_target = bind(target, binding)
            assert numpy_reshape(bind(shape, binding), bound_target) == bound_target


def test_reshape_examples_with_symbols_and_zero_sizes():
    s, t = Sym("s"), Sym("t")
    assert rule_shape("reshape", [(s, 4, 2)], shape=(s, 8)) == (s, 8)
    assert rule_shape("reshape", [(s, t)], shape=(t, 1, s)) == (t, 1, s)
    assert rule_shape("reshape", [(s, 4)], shape=(4, t)) is None
    assert rule_shape("reshape", [(s, s)], shape=(s,)) is None
    # Zero elements whatever s is: NumPy accepts these for every binding.
    assert rule_shape("reshape", [(0, s)], shape=(0,)) == (0,)
    assert rule_shape("reshape", [(s, 0)], shape=(0, 4)) == (0, 4)
    # The IR has no -1 placeholder: every target dim is explicit.
    assert numpy_reshape((2, 3), (-1,)) == (6,)
    assert rule_shape("reshape", [(2, 3)], shape=(-1,)) is None
