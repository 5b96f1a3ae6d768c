"""The graph IR of mlcc: types, ops, builders, printer, verifier and the NumPy interpreter.

This package is the floor of the project: it imports nothing else of mlcc.
"""

from mlcc.ir import collective as _collective_ops  # noqa: F401  (registers all_reduce)
from mlcc.ir import fused as _fused_ops  # noqa: F401  (registers qkv_attention, add_*_norm)
from mlcc.ir import kv as _kv_ops  # noqa: F401  (registers positions/rope/attention)
from mlcc.ir import moe_ops as _moe_ops  # noqa: F401  (registers moe_dispatch/moe_linear/...)
from mlcc.ir import ops as _core_ops  # noqa: F401  (registers the core ops)
from mlcc.ir import quant_ops as _quant_ops  # noqa: F401  (registers q_linear/q_embedding)
from mlcc.ir.builder import FunctionBuilder, ModuleBuilder, current_builder
from mlcc.ir.core import Function, Module, Node, Param, Value, param_value
from mlcc.ir.interpret import InterpretError, interpret
from mlcc.ir.kv import KVCacheState
from mlcc.ir.printer import print_function, print_module
from mlcc.ir.registry import OPS, AttrSpec, OpDef, TypeRuleError, get_op, register
from mlcc.ir.types import Dim, KVCacheType, Sym, TensorType
from mlcc.ir.verify import VerifyError, verify

__all__ = [
    "AttrSpec", "Dim", "Function", "FunctionBuilder", "InterpretError", "KVCacheState",
    "KVCacheType", "Module", "ModuleBuilder", "Node", "OPS", "OpDef", "Param", "Sym",
    "TensorType", "TypeRuleError", "Value", "VerifyError", "current_builder", "get_op",
    "interpret", "param_value", "print_function", "print_module", "register", "verify",
]
