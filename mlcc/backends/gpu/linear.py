"""`linear` / `q_linear` for the TVM-generated GPU languages, as tensor expressions.

y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]), W dequantized on the fly for q_linear exactly as the
IR interpreter does (float32 accumulation, each weight rounded through the scale dtype, the
result rounded to the output dtype). The function has one block per stage (dequantize, matmul,
epilogue) so TVM's dlight rules can schedule it for the target: GEMV for decode (a static row
count), Matmul for prefill (a symbolic row count), each reading the target's thread, shared
memory and warp limits; a warp size of 1 makes the reductions go through shared memory
instead of warp shuffles. With `schedule=False` the function stays unscheduled (serial loops),
which builds for the CPU and checks the definition against the interpreter.
"""

from __future__ import annotations

from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Dim, Sym


def _dims(shape: tuple[Dim, ...], symbols: dict) -> list:
    from tvm import te, tirx

    out = []
    for d in shape:
        if isinstance(d, Sym):
            out.append(symbols.setdefault(d.name, te.var(d.name, dtype="int64")))
        else:
            out.append(tirx.IntImm("int64", int(d)))
    return out


def linear_compute(spec: KernelSpec, name: str):
    """The unscheduled PrimFunc (global_symbol `name`) of a linear or q_linear spec."""
    from tvm import te, tirx

    symbols: dict = {}
    (xshape, xdt), (yshape, ydt) = spec.inputs[0], spec.outputs[0]
    x = te.placeholder(_dims(xshape, symbols), xdt, name="x")
    quant = spec.op == "q_linear"
    i64 = lambda v: tirx.IntImm("int64", v)  # one index dtype everywhere (dlight needs it)
    if quant:
        (wshape, wdt), (sshape, sdt) = spec.inputs[1], spec.inputs[2]
        qw = te.placeholder(_dims(wshape, symbols), wdt, name="qw")
        qs = te.placeholder(_dims(sshape, symbols), sdt, name="qs")
        bits, group = spec.attr("bits"), spec.attr("group_size")
        per_word, max_int, mask = 32 // bits, (1 << (bits - 1)) - 1, (1 << bits) - 1
        n_out, k_total = int(wshape[0]), int(spec.attr("in_features"))

        def dequant(n, k):
            word = qw[n, k // i64(per_word)]
            shift = ((k % i64(per_word)) * i64(bits)).astype("uint32")
            code = ((word >> shift) & tirx.const(mask, "uint32")).astype("float32")
            value = (code - tirx.const(max_int, "float32")) * qs[n, k // i64(group)].astype(
                "float32")
            return value.astype(sdt).astype("float32")

        weight = te.compute((i64(n_out), i64(k_total)), dequant, name="dequant")
        inputs = [x, qw, qs]
    else:
        (wshape, wdt) = spec.inputs[1]
        w = te.placeholder(_dims(wshape, symbols), wdt, name="w")
        n_out, k_total = int(wshape[0]), int(wshape[1])
        weight = te.compute((i64(n_out), i64(k_total)),
                            lambda n, k: w[n, k].astype("float32"), name="widen")
        inputs = [x, w]
    rows = _dims(yshape, symbols)[0]
    k = te.reduce_axis((i64(0), i64(k_total)), name="k")
    acc = te.compute((rows, i64(n_out)),
                     lambda m, n: te.sum(x[m, k].astype("float32") * weight[n, k], axis=k),
                     name="matmul")
    if len(spec.inputs) == (4 if quant else 3):
        (bshape, bdt) = spec.inputs[-1]
        b = te.placeholder(_dims(bshape, symbols), bdt, name="b")
        inputs.append(b)
        y = te.compute((rows, i64(n_out)),
                       lambda m, n: (acc[m, n] + b[n].astype("float32")).astype(ydt), name="y")
    else:
        y = te.compute((rows, i64(n_out)), lambda m, n: acc[m, n].astype(ydt), name="y")
    func = te.create_prim_func(inputs + [y])
    return func.with_attr("global_symbol", name)


def schedule_linear(func, target):
    """dlight's GPU rules for the target (the first that applies); None when none does.

    On Metal, dlight's Matmul would take its simdgroup-matrix path (Apple7+ GPUs only, and its
    intrinsics take a minute to import): it gets the same limits under the opencl kind instead,
    which selects the portable shared-memory tiling."""
    import tvm
    from tvm.s_tir import dlight as dl

    matmul_target = target
    if target.kind.name == "metal":
        attrs = {k: target.attrs[k] for k in ("max_num_threads", "max_shared_memory_per_block",
                                              "thread_warp_size") if k in target.attrs}
        matmul_target = tvm.target.Target({"kind": "opencl", **attrs})
    rules = [(dl.gpu.GEMV(), target), (dl.gpu.LowBatchGEMV(), target),
             (dl.gpu.Matmul(), matmul_target), (dl.gpu.Fallback(), target)]
    for rule, rule_target in rules:
        try:
            with rule_target:
                sch = rule.apply(func, rule_target, False)
        except Exception:  # noqa: BLE001  a rule that cannot handle the shape: try the next
            sch = None
        if sch is None:
            continue
        if isinstance(sch, list):
            sch = sch[0]
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None
