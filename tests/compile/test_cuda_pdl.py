"""Programmatic dependent launch (the `pdl` knob) in the CUDA build, checked without a GPU.

What must hold for the overlap to be safe: every kernel of a pdl library is tagged for the
runtime's programmatic launch, and every kernel waits (griddepcontrol.wait) before it reads an
activation or writes anything; only the decode GEMVs issue loads before the wait, and those
read their weights alone. On the GPU the parity tests run the pdl libraries (O2) with and
without the CUDA graph.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlcc.backends.cuda import toolchain
from mlcc.backends.cuda.codegen import (
    early_release,
    kernel_for,
    kernel_names,
    library_parts,
    wait_release,
)
from mlcc.backends.cuda.kernels import GRID_WAIT
from mlcc.backends.plan import EntryPlan, KernelSpec
from mlcc.passes import parse_opt

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def q_spec(rows: int, n: int, k: int) -> KernelSpec:
    return KernelSpec("q_linear", (((rows, k), "float16"), ((n, k // 8), "uint32"),
                                   ((n, k // 32), "float16")), (((rows, n), "float16"),),
                      (("bits", 4), ("group_size", 32), ("in_features", k)))


def test_prologue_goes_into_wrappers_but_not_prototypes_or_self_waiting_kernels():
    code = ('extern "C" __global__ void a_kernel(half* x);\n'
            'extern "C" __global__ void __launch_bounds__(64) a_kernel(half* x) {\n'
            '  a_dev(x);\n}\n\n'
            'extern "C" __global__ void b_kernel(half* x) {\n  b_dev(x, 2);\n}\n'
            'extern "C" __global__ void c_kernel(half* x) {\n  c_dev(x);\n}\n'
            'extern "C" __global__ void d_kernel(half* x) {\n  d_dev(x);\n}\n'
            'extern "C" __global__ void e_kernel(half* x) {\n  e_dev(x);\n}\n'
            'extern "C" __global__ void f_kernel(half* x) {\n  b_dev(x, 3);\n}\n')
    out = toolchain.with_pdl_prologue(code, frozenset({"b_dev", "d_dev"}),
                                      frozenset({"c_dev", "d_dev"}), frozenset({"e_dev", "b_dev"}))
    wait, release = GRID_WAIT, toolchain.EARLY_RELEASE
    assert 'a_kernel(half* x);\n' in out  # the prototype is left alone
    assert f"a_kernel(half* x) {{\n  {wait}\n  a_dev(x);" in out
    assert "b_kernel(half* x) {\n  b_dev(x, 2);" in out
    assert f"c_kernel(half* x) {{\n  {release}\n  {wait}\n  c_dev(x);" in out
    assert f"d_kernel(half* x) {{\n  {release}\n  d_dev(x);" in out
    assert f"e_kernel(half* x) {{\n  {wait}\n  {release}\n  e_dev(x);" in out
    # a kernel that waits itself has no wrapper wait to release after
    assert "f_kernel(half* x) {\n  b_dev(x, 3);" in out


def test_early_release_only_ahead_of_single_block_kernels():
    from test_cuda_codegen import lowered

    built, plans, _, _ = library_parts(lowered("llama2_7b", "q4f16_1"), {"params": []},
                                       fuse_glu=True)
    names = kernel_names(plans)
    single = {k.name for k in built if k.single_block()}
    early = early_release(plans, built)
    decode = next(p for p in plans if p.name == "decode")
    ops = {names[c.spec].split("_", 1)[1] for c in decode.calls if f"{names[c.spec]}_dev" in early}
    assert ops == {"q_embedding", "q_linear"}, ops  # o_proj and down ahead of a one-row norm
    assert len(early) == 3
    for plan in plans:
        seq = [names[c.spec] for c in plan.calls]
        for here, after in zip(seq, seq[1:] + [None]):
            if f"{here}_dev" in early:
                assert after in single, (here, after)


def test_early_release_names_the_function_a_kernel_launches_last():
    # The decode attention's device function is `{name}_decode` and the prefill attention runs
    # `_append` then `_flash`: followed by a one-block kernel, the function of the kernel's last
    # launch is the one released early, whatever its name.
    from test_cuda_codegen import lowered

    built, plans, _, _ = library_parts(lowered("llama2_7b", "q4f16_1"), {"params": []},
                                       fuse_glu=True)
    names = kernel_names(plans)
    by_name = {k.name: k for k in built}
    calls = {p.name: p.calls for p in plans}
    attention = {p: next(c for c in calls[p] if c.spec.op == "qkv_attention")
                 for p in ("prefill", "decode")}
    norm = next(c for c in calls["decode"] if by_name[names[c.spec]].single_block())
    assert by_name[names[attention["decode"].spec]].device_functions() == (
        f"{names[attention['decode'].spec]}_decode",)
    assert len(by_name[names[attention["prefill"].spec]].device_functions()) == 2
    for entry, call in attention.items():
        fake = [EntryPlan(entry, [], [call, norm])]
        fake_built = [kernel_for(spec, name) for spec, name in kernel_names(fake).items()]
        launched = fake_built[0].device_functions()
        early = early_release(fake, fake_built)
        assert early == {launched[-1]}, (entry, early)


def test_single_block_kernels_release_after_their_wait():
    from test_cuda_codegen import lowered

    built, plans, _, _ = library_parts(lowered("llama2_7b", "q4f16_1"),
                                       {"params": [], "model_config": {"vocab_size": 32000}},
                                       fuse_glu=True)
    early = early_release(plans, built)
    late = wait_release(built, early)
    ops = {name.removesuffix("_dev").split("_", 1)[1] for name in late}
    # the one-row norms and the token pickers; the embedding releases early instead
    assert ops == {"rms_norm", "add_rms_norm", "argmax", "sample"}, ops
    assert not late & early
    single = {f"{k.name}_dev" for k in built if k.single_block()}
    assert late | early >= single and late <= single


def test_pdl_needs_sm_90_for_every_architecture():
    assert toolchain.pdl_supported(("sm_90",)) and toolchain.pdl_supported(("sm_90a", "sm_100"))
    assert not toolchain.pdl_supported(("sm_90", "sm_80"))
    assert not toolchain.pdl_supported(("sm_86",))


def test_knob_is_on_from_o2():
    assert parse_opt("O2").enabled("pdl") and parse_opt("O3").enabled("pdl")
    assert not parse_opt("O1").enabled("pdl") and not parse_opt("O2;pdl=0").enabled("pdl")


@pytest.mark.parametrize("rows,n,k", [(1, 22016, 4096), (1, 4096, 4096), (1, 4096, 11008),
                                      (1, 32000, 4096), (1, 4096, 64)])
def test_decode_gemv_waits_after_its_weight_loads_and_before_activations(rows, n, k):
    source = kernel_for(q_spec(rows, n, k), "k0_q_linear").device_source
    assert source.count(GRID_WAIT) == 1, "one wait, in the first staging pass"
    wait = source.index(GRID_WAIT)
    body = source[source.index("{"):]
    assert source.index("__ldg(") < wait, "the weight loads come first"
    reads = [m.start() for m in re.finditer(r"\bx \+|\bx\[|__syncthreads|mlcc_put\(", source)]
    assert reads and min(reads) > wait, "no activation read, barrier or store before the wait"
    assert "y[" not in body[:wait - source.index("{")]


@needs_nvcc
@pytest.mark.slow
def test_pdl_library_tags_every_kernel_and_waits_in_each(tmp_path, monkeypatch):
    from mlcc.interface.compile import compile_model

    sources = {}
    for name, opt in (("pdl", "O2;l2_prefetch=1"), ("plain", "O2;pdl=0;l2_prefetch=1")):
        keep = tmp_path / f"{name}.cu"
        monkeypatch.setenv("MLCC_CUDA_KEEP_SOURCE", str(keep))
        compile_model(STORIES, tmp_path / f"{name}.so", quantization="q4f16_1", device="cuda",
                      opt=opt)
        sources[name] = keep.read_text()
    pdl, plain = sources["pdl"], sources["plain"]
    wrappers = re.findall(r'extern "C" __global__[^;{]*\{(.*?)\n\}', pdl, re.DOTALL)
    assert len(wrappers) >= 10
    waiting = {m.group(1) for m in re.finditer(
        r"int (\w+_dev|\w+_pf)\([^)]*\) \{(?:(?!\n\}\n).)*" + re.escape(GRID_WAIT), pdl,
        re.DOTALL)}
    assert waiting, "the decode GEMVs wait themselves"
    # The light kernels before the decode GEMVs prefetch, then wait (mlcc.backends.cuda.prefetch).
    assert any(name.endswith("_pf") for name in waiting)
    released = after_wait = 0
    for body in wrappers:
        calls = set(re.findall(r"\b(\w+)\s*\(", body))
        head = body.lstrip()
        if head.startswith(toolchain.EARLY_RELEASE):
            released += 1
            head = head[len(toolchain.EARLY_RELEASE):].lstrip()
        assert head.startswith(GRID_WAIT) != bool(calls & waiting), body
        if head.startswith(GRID_WAIT + "\n  " + toolchain.EARLY_RELEASE):
            after_wait += 1
    assert released >= 2  # the decode o_proj and down GEMVs, ahead of a one-row norm
    assert after_wait >= 2  # the one-row norms, the argmax
    assert pdl.index(toolchain.PDL_DEFINE) < pdl.index("mlcc_grid_wait() {")
    assert toolchain.PDL_DEFINE not in plain
    plain_wrappers = re.findall(r'extern "C" __global__[^;{]*\{(.*?)\n\}', plain, re.DOTALL)
    assert len(plain_wrappers) == len(wrappers)
    assert not any(body.lstrip().startswith(GRID_WAIT) for body in plain_wrappers)
    tag = toolchain.PDL_TAG.encode()
    assert (tmp_path / "pdl.so").read_bytes().count(tag) == len(wrappers)
    assert tag not in (tmp_path / "plain.so").read_bytes()
    # the helpers compile to the PTX instructions with the define, to nothing without it
    for name, expect in (("pdl", True), ("plain", False)):
        src = tmp_path / f"{name}_ptx.cu"
        src.write_text(sources[name])
        done = subprocess.run(["nvcc", "--ptx", "-std=c++17", "-arch=sm_90", "-o",
                               str(tmp_path / f"{name}.ptx"), str(src)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-1500:]
        ptx = (tmp_path / f"{name}.ptx").read_text()
        assert ("griddepcontrol.wait" in ptx) == expect
        if expect:
            assert ptx.count("griddepcontrol.wait") >= len(wrappers)
            assert ptx.count("griddepcontrol.launch_dependents") >= released + after_wait


def test_sm_80_build_leaves_pdl_off(tmp_path, monkeypatch):
    from mlcc.backends.cuda import codegen
    from mlcc.interface.compile import load_model_config
    from mlcc.passes import build_pipeline, run_passes
    from mlcc.quant import get_scheme

    calls, logged = {}, []
    monkeypatch.setattr(codegen, "compile_library",
                        lambda built, host, cpu, output, archs, pdl=False, early=frozenset(),
                        after_wait=frozenset():
                        calls.update(pdl=pdl, early=len(early), after_wait=len(after_wait)))
    arch, config, quant, _ = load_model_config(STORIES, "q4f16_1", None)
    passes = build_pipeline(parse_opt("O2"), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    codegen.build(module, tmp_path / "x.so", {"params": []}, ("sm_90", "sm_80"), logged.append,
                  pdl=True)
    assert calls == {"pdl": False, "early": 0, "after_wait": 0}
    assert any(line.startswith("pdl off") for line in logged)
    codegen.build(module, tmp_path / "x.so", {"params": []}, ("sm_90",), logged.append, pdl=True)
    assert calls["pdl"] is True and calls["early"] > 0 and calls["after_wait"] > 0
