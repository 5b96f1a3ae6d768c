"""Entry functions: one compiled host function per model entry point that calls its kernels.

An entry (`prefill`, `decode`, ...) is a public PrimFunc whose body only binds its arguments,
carves intermediates out of one workspace and calls kernels of the same library, in order,
through `T.call_cpacked`. Nothing runs in Python between kernels. The API is device-neutral:

    eb = EntryBuilder("prefill", symbol_bounds={"seq_len": 2048})
    tokens = eb.arg("tokens", ("seq_len",), "int32", role="tokens")
    info = eb.arg("seq_info", (2,), "int32", role="seq_info")
    pool = eb.arg("kv_pool", (layers, pages, 2, kv_heads, 16, d), "float16", role="kv_cache")
    w = eb.param("model.embed_tokens.weight", (vocab, hidden), "float16")   # one per tensor
    logits = eb.arg("logits", (vocab,), "float32", role="logits")
    h = eb.temp("h", ("seq_len", hidden), "float16", offset_bytes=0)       # workspace view
    layer0 = eb.view(pool, "kv_pages_0", (pages, 2, kv_heads, 16, d), "float16", 0)
    eb.call(embedding_kernel, [tokens, w, h])       # a PrimFunc (checked) or its name
    func = eb.finish()                              # tvm.tirx.PrimFunc named "prefill"

Arguments keep the order in which they were declared; with `workspace="arg"` (the default) the
workspace `uint8[workspace_bytes]` comes last and may be larger than needed (one buffer can
serve every entry); with `workspace="alloc"` the entry allocates it on each call. Symbolic dims
are shared by name across the entry and bound from the first argument that has them; each one
needs an upper bound, which sizes the workspace and is checked when the entry is called.
Workspace offsets are in bytes and 64-byte aligned (kernels assume aligned data). The finished
function carries its signature as JSON in the attribute `mlcc.signature` (see `signature()`),
which `build_library` copies into the library metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import tirx
from tvm.tirx.buffer import BufferType

from mlcc.backends.layouts import Dim, dims_text
from mlcc.errors import MlccError

STAGE = "compile"
ALIGN = 64
DL_DATA, DL_BYTE_OFFSET = 1, 8  # tvm_struct_get fields of a DLTensor
ROLES = ("tokens", "seq_info", "page_table", "kv_cache", "param", "logits", "input", "output",
         "scalar")
CallArg = tirx.Buffer | tirx.Var | int | float


class EntryBuilder:
    """Builds one entry PrimFunc; see the module docstring."""

    def __init__(self, name: str, symbol_bounds: Mapping[str, int] | None = None,
                 workspace: str = "arg", workspace_bytes: int | None = None,
                 device_type: int = 1, check_params: bool = False) -> None:
        if not name.isidentifier():
            raise MlccError(STAGE, f"entry name {name!r} must be a C identifier")
        if workspace not in ("arg", "alloc"):
            raise MlccError(STAGE, f"entry {name}: workspace={workspace!r}; use 'arg' or 'alloc'")
        self.name = name
        self.bounds = dict(symbol_bounds or {})
        self.workspace_mode = workspace
        self.workspace_bytes = workspace_bytes
        self.device_type = device_type  # DLPack device of the workspace (1 = CPU)
        self.check_params = check_params
        self._param_decls: list[tirx.Stmt] = []
        self._symbols: dict[str, tirx.Var] = {}
        self._params: list[tirx.Buffer | tirx.Var] = []
        self._arg_info: list[dict[str, Any]] = []
        self._stmts: list[tirx.Stmt | tirx.Buffer] = []
        self._names: set[str] = set()
        self._next_offset = 0
        self._needed = 0  # bytes of workspace the temps reach
        self.kernels: dict[str, tirx.PrimFunc] = {}
        self._temps: dict[int, int] = {}  # statement index -> workspace offset of a temp

    # --- declarations -----------------------------------------------------------------

    def _symbol(self, name: str) -> tirx.Var:
        if name not in self._symbols:
            self._symbols[name] = tirx.Var(name, "int64")
        return self._symbols[name]

    def _shape(self, shape: Sequence[Dim], what: str) -> list:
        dims = []
        for d in shape:
            if isinstance(d, str):
                dims.append(self._symbol(d))
            elif isinstance(d, int) and not isinstance(d, bool) and d > 0:
                dims.append(tirx.IntImm("int64", d))
            else:
                raise MlccError(STAGE, f"entry {self.name}: {what} has extent {d!r}; use a "
                                "positive int or a symbol name")
        return dims

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise MlccError(STAGE, f"entry {self.name}: {name!r} is declared twice")
        self._names.add(name)

    def arg(self, name: str, shape: Sequence[Dim], dtype: str, role: str = "input"
            ) -> tirx.Buffer:
        """A tensor argument, in declaration order."""
        if role not in ROLES:
            raise MlccError(STAGE, f"entry {self.name}: argument {name} has role {role!r}; use "
                            f"one of {', '.join(ROLES)}")
        self._claim(name)
        buf = tirx.decl_buffer(self._shape(shape, name), dtype, name=_c_name(name))
        self._params.append(buf)
        self._arg_info.append({"name": name, "role": role, "shape": list(shape),
                               "dtype": dtype})
        return buf

    def param(self, name: str, shape: Sequence[Dim], dtype: str) -> tirx.Buffer:
        """A model parameter (weights keep their load order as arguments).

        Unless `check_params`, the argument is taken as a bare tensor handle: its shape and
        dtype are not checked per call (the runtime checks the weights once, at load time).
        Per-argument checks grow the host function by ~175 lines of LLVM IR each, and LLVM's
        code generation time grows quadratically with them: 300 checked tensors took ~40 s.
        """
        if self.check_params:
            return self.arg(name, shape, dtype, role="param")
        if not all(isinstance(d, int) for d in shape):
            raise MlccError(STAGE, f"entry {self.name}: parameter {name} has symbolic shape "
                            f"{dims_text(shape)}; parameters need static shapes")
        self._claim(name)
        handle = tirx.Var(_c_name(name) + "_handle", "handle")
        buf = tirx.decl_buffer(self._shape(shape, name), dtype, name=_c_name(name))
        data = tirx.call_intrin("handle", "tirx.tvm_struct_get", handle, 0, DL_DATA)
        offset = tirx.call_intrin("int64", "tirx.tvm_struct_get", handle, 0, DL_BYTE_OFFSET)
        pointer = tirx.call_intrin("handle", "tirx.handle_add_byte_offset", data, offset)
        self._param_decls.append(tirx.DeclBuffer(buf, data=pointer))
        self._params.append(handle)
        self._arg_info.append({"name": name, "role": "param", "shape": list(shape),
                               "dtype": dtype})
        return buf

    def scalar(self, name: str, dtype: str = "int32", role: str = "scalar") -> tirx.Var:
        """A scalar argument, passed to kernels as a value."""
        self._claim(name)
        var = tirx.Var(_c_name(name), dtype)
        self._params.append(var)
        self._arg_info.append({"name": name, "role": role, "shape": [], "dtype": dtype})
        return var

    def temp(self, name: str, shape: Sequence[Dim], dtype: str,
             offset_bytes: int | None = None) -> tirx.Buffer:
        """An intermediate at `offset_bytes` of the workspace (next free aligned spot if None)."""
        self._claim(name)
        dims = self._shape(shape, name)
        nbytes = self._max_bytes(shape, dtype, name)
        if offset_bytes is None:
            offset_bytes = self._next_offset
        if offset_bytes < 0 or offset_bytes % ALIGN:
            raise MlccError(STAGE, f"entry {self.name}: temp {name} at byte {offset_bytes}; "
                            f"workspace offsets must be non-negative multiples of {ALIGN}")
        end = offset_bytes + nbytes
        self._next_offset = max(self._next_offset, -(-end // ALIGN) * ALIGN)
        self._needed = max(self._needed, end)
        buf = tirx.decl_buffer(dims, dtype, name=_c_name(name))
        # The workspace buffer is only known in finish(): the DeclBuffer is made there.
        self._temps[len(self._stmts)] = offset_bytes
        self._stmts.append(buf)
        return buf

    def view(self, base: tirx.Buffer, name: str, shape: Sequence[int], dtype: str,
             offset_bytes: int) -> tirx.Buffer:
        """A static-shape window into an argument, e.g. one layer of a KV page pool."""
        self._claim(name)
        if not any(base.same_as(p) for p in self._params):
            raise MlccError(STAGE, f"entry {self.name}: view {name} needs an argument of this "
                            "entry as its base")
        base_shape = [int(d) for d in base.shape] if all(
            isinstance(d, tirx.IntImm) for d in base.shape) else None
        itemsize = np.dtype(str(base.dtype)).itemsize
        nbytes = self._max_bytes(shape, dtype, name)
        total = int(np.prod(base_shape)) * itemsize if base_shape else -1
        if base_shape is None or offset_bytes % ALIGN or offset_bytes + nbytes > total:
            raise MlccError(STAGE, f"entry {self.name}: view {name} of {nbytes} bytes at byte "
                            f"{offset_bytes} must be {ALIGN}-aligned and lie inside "
                            f"{base.name} ({total} bytes, static shape required)")
        index = np.unravel_index(offset_bytes // itemsize, base_shape)
        pointer = tirx.address_of(tirx.BufferLoad(
            base, [tirx.IntImm("int64", int(i)) for i in index]))
        buf = tirx.decl_buffer(self._shape(shape, name), dtype, name=_c_name(name))
        self._stmts.append(tirx.DeclBuffer(buf, data=pointer))
        return buf

    def _max_bytes(self, shape: Sequence[Dim], dtype: str, what: str) -> int:
        count = 1
        for d in shape:
            if isinstance(d, str):
                if d not in self.bounds:
                    raise MlccError(STAGE, f"entry {self.name}: {what} uses symbol {d} without "
                                    "an upper bound; pass symbol_bounds={'" + d + "': N}")
                count *= self.bounds[d]
            else:
                count *= int(d)
        return count * np.dtype(dtype).itemsize

    # --- calls and the finished function ----------------------------------------------

    def call(self, kernel: str | tirx.PrimFunc, args: Sequence[CallArg]) -> None:
        """Call a kernel of the same library with buffers, scalar arguments or constants."""
        if isinstance(kernel, tirx.PrimFunc):
            name = str(kernel.attrs["global_symbol"])
            known = self.kernels.get(name)
            if known is not None and not known.same_as(kernel):
                raise MlccError(STAGE, f"entry {self.name}: two different kernels are named "
                                f"{name}; give each generated kernel a unique name")
            _check_call(self.name, name, kernel, args)
            self.kernels[name] = kernel
        else:
            name = kernel
        values = [_call_value(a) for a in args]
        self._stmts.append(tirx.Evaluate(tirx.call_cpacked(name, *values)))

    def signature(self) -> dict[str, Any]:
        """JSON-safe description of the arguments, in calling order."""
        args = list(self._arg_info)
        if self.workspace_mode == "arg":
            args.append({"name": "workspace", "role": "workspace",
                         "shape": [self.required_workspace], "dtype": "uint8"})
        return {"name": self.name, "args": args, "workspace_bytes": self.required_workspace,
                "workspace": self.workspace_mode, "symbol_bounds": dict(self.bounds),
                "kernels": list(self.kernels)}

    @property
    def required_workspace(self) -> int:
        needed = max(self._needed, ALIGN)
        if self.workspace_bytes is not None:
            if self.workspace_bytes < needed:
                raise MlccError(STAGE, f"entry {self.name}: workspace_bytes "
                                f"{self.workspace_bytes} is below the {needed} bytes its temps "
                                "reach at the symbols' upper bounds")
            return self.workspace_bytes
        return needed

    def finish(self) -> tirx.PrimFunc:
        """The entry PrimFunc, exported as `name`, with its signature attached."""
        bound_in_args = {v.name for p in self._params if is_buffer(p)
                         for v in _vars_of(p.shape)}
        body: list[tirx.Stmt] = []
        for sym in self._symbols:
            if sym not in bound_in_args:
                raise MlccError(STAGE, f"entry {self.name}: symbol {sym} appears in no argument "
                                "shape, so no call can bind it; add an argument that has it")
            if sym in self.bounds:
                body.append(_assert(self._symbols[sym] <= self.bounds[sym],
                                    f"{self.name}: {sym} exceeds the compiled upper bound "
                                    f"{self.bounds[sym]}; split the input into chunks"))
        needed = self.required_workspace
        params = list(self._params)
        if self.workspace_mode == "arg":
            ws_var = tirx.Var("workspace_bytes", "int64")
            workspace = tirx.decl_buffer((ws_var,), "uint8", name="workspace")
            params.append(workspace)
            body.append(_assert(ws_var >= needed, f"{self.name}: the workspace must hold at "
                                f"least {needed} bytes"))
        else:
            # TVMBackendAllocWorkspace: an AllocBuffer cannot be addressed at an offset here.
            workspace = tirx.Var("workspace", "handle")
            body.append(tirx.LetStmt(workspace, tirx.TVMBackendAllocWorkspace(
                self.device_type, 0, tirx.IntImm("uint64", needed), 0, 8)))
            body.append(_assert(tirx.Not(tirx.isnullptr(workspace)),
                                f"{self.name}: cannot allocate a {needed}-byte workspace"))
        body.extend(self._param_decls)
        for index, stmt in enumerate(self._stmts):
            if index in self._temps:
                stmt = tirx.DeclBuffer(stmt, data=_offset_pointer(workspace, self._temps[index]))
            body.append(stmt)
        if self.workspace_mode == "alloc":
            body.append(tirx.Evaluate(tirx.TVMBackendFreeWorkspace(self.device_type, 0,
                                                                   workspace)))
        func = tirx.PrimFunc(params, tirx.SeqStmt(body))
        return func.with_attrs({"global_symbol": self.name,
                                "mlcc.signature": json.dumps(self.signature())})


def is_buffer(value: Any) -> bool:
    """Buffers are variables whose type is a BufferType in this TVM."""
    return isinstance(value, tirx.Var) and isinstance(value.ty, BufferType)


def _offset_pointer(workspace: tirx.Buffer | tirx.Var, offset: int) -> tirx.PrimExpr:
    if is_buffer(workspace):
        return tirx.address_of(tirx.BufferLoad(workspace, [tirx.IntImm("int64", offset)]))
    return tirx.call_intrin("handle", "tirx.handle_add_byte_offset", workspace,
                            tirx.IntImm("int64", offset))


def _c_name(name: str) -> str:
    text = "".join(c if c.isalnum() else "_" for c in name)
    return text if text[:1].isalpha() else "v_" + text


def _vars_of(shape) -> list[tirx.Var]:
    return [d for d in shape if isinstance(d, tirx.Var)]


def _assert(cond: tirx.PrimExpr, message: str) -> tirx.Stmt:
    # tirx.AssertStmt's Python wrapper passes (kind, condition) to a constructor that expects
    # (condition, kind); giving them in the constructor's order yields the intended node.
    return tirx.AssertStmt(cond, tvm.ir.StringImm("ValueError"), [tvm.ir.StringImm(message)])


def _call_value(arg: CallArg):
    if isinstance(arg, tirx.Var):
        return arg
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise MlccError(STAGE, f"kernel argument {arg!r} must be a buffer, a scalar argument, "
                        "an int or a float")
    return tirx.IntImm("int64", arg) if isinstance(arg, int) else tirx.FloatImm("float32", arg)


def _check_call(entry: str, name: str, kernel: tirx.PrimFunc, args: Sequence[CallArg]) -> None:
    """Catch argument mistakes at build time instead of as a crash inside the library."""
    params = list(kernel.params)
    if len(params) != len(args):
        raise MlccError(STAGE, f"entry {entry}: kernel {name} takes {len(params)} arguments "
                        f"({', '.join(p.name for p in params)}), got {len(args)}")
    for param, arg in zip(params, args):
        if is_buffer(param):
            if not is_buffer(arg):
                raise MlccError(STAGE, f"entry {entry}: kernel {name} argument {param.name} is "
                                f"a buffer, got {arg!r}")
            _check_buffer(entry, name, param, arg)
        elif is_buffer(arg):
            raise MlccError(STAGE, f"entry {entry}: kernel {name} argument {param.name} is a "
                            f"{param.dtype} scalar, got buffer {arg.name}")


def _check_buffer(entry: str, name: str, param: tirx.Buffer, arg: tirx.Buffer) -> None:
    same_rank = len(param.shape) == len(arg.shape)
    same_dims = same_rank and all(
        not (isinstance(p, tirx.IntImm) and isinstance(a, tirx.IntImm)) or int(p) == int(a)
        for p, a in zip(param.shape, arg.shape))
    if str(param.dtype) != str(arg.dtype) or not same_dims:
        raise MlccError(STAGE, f"entry {entry}: kernel {name} argument {param.name} expects "
                        f"{param.dtype}{dims_text(_dims(param.shape))}, got {arg.name} "
                        f"{arg.dtype}{dims_text(_dims(arg.shape))}")


def _dims(shape) -> list:
    return [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in shape]
