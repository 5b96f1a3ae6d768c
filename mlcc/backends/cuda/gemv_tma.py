"""Decode GEMV fed by bulk copies of its weight slice into shared memory, started before its wait.

One block per SM (`ceil(N / SMS)` consecutive output features a block, and at least half an
SM's shared memory, so that no SM gets two however the grid is placed). Before the kernel waits
for the one ahead (GRID_WAIT), its packed weights and scales start moving into dynamic shared
memory by bulk copies (`cp.async.bulk`, sm_90: one instruction moves kilobytes, no register or
load slot held while in flight), a chunk of `chunk` features per mbarrier. With `depth` (the
default) an extra producer warp issues them, chunk c once chunk c - depth has landed, and never
waits for the kernel ahead; without it one thread issues `early` chunks (all by default) before
the wait and the rest after the staging.

After the wait the consumer warps stage the row for the integer dot (intdot.stage_dp2a), each
lane copies the staged words of its groups into registers once, and the warps take the chunks
as they land: warp w = (slice, team) multiplies the groups of K slice `slice` (of `ks`) with the
features `team`, `team + teams`, ... of the chunk; with `ks` > 1 the slices' warp sums meet in
shared memory and one thread a feature adds them in a fixed order. Arithmetic and rounding are
the one-shot GEMV's with the integer dot: a group's products are an exact integer sum, then
one float32 term; the features' sums differ only in the order their group terms are added (with
one K slice the 7B qkv and o_proj logits come out bit for bit the one-shot GEMV's).

The GLU mode (`gemv_tma_glu_kernel`, the decode linear_silu_mul of mlcc.backends.cuda.glu)
takes a gate_up weight whose slice does not fit: the producer streams chunks of GLU_CHUNK
features (their gate rows f and up rows I + f) through a ring of slots, refilling a slot once
the consumer warps have released it (an mbarrier per slot for each direction); each consumer
warp takes one feature of a chunk, rounds g and u to float16 as the unfused GEMV stores them
and stores silu(g) * u (glu.SILU_MUL).

Where it runs (`mark`, knob `tma_gemv`, on from O2 with pdl, sm_90 and newer): one-row q4 GEMVs
(groups of 32, float16 activations and scales) whose slice and staged row fit a block's shared
memory (232,448 bytes on sm_90), or gate_up + silu_mul GEMVs whose ring fits, in two places:
- behind a latency-bound kernel (BEHIND_LIGHT): a one-row norm, which releases the GEMV once
  its own wait returns, or the decode attention, which then releases it at its start
  (codegen.early_release). Their copies run while that kernel does its few round trips.
  Behind the attention, the 7B o_proj's blocks on the 32 SMs running its blocks start only
  when it ends: those SMs' shared-memory carveout is sized for the attention. Letting them in
  (a context preferring shared memory) slowed the attention, beside the whole stream, by more
  than it saved (0.94-0.98x; benchmarks/results/2026-11-30-h200-g).
- behind the gate_up + silu_mul GEMV (BEHIND_GLU: the down GEMV), released only when that
  ends, with 16 consumer warps (stream_config). Copies started during the GLU's tail (released
  at its start) slowed the GLU's last blocks by more than they saved (0.96-0.98x); placed after
  it, the kernel beats the one-shot GEMV because twice the consumer warps keep up with the
  stream (1.03x; benchmarks/results/2026-11-30-h200-e).

A residual add + RMSNorm between two of these GEMVs is folded into them (knob `tma_fold`,
mlcc.backends.cuda.norm_fold): the GEMV ahead adds the residual (`residual`: its block's
residual values staged after its wait, one partial sum of squares a block), the GEMV after
normalizes its row as it stages it (`norm`), marked BEHIND_FOLD and released at the start of
the GEMV ahead.

Measured on an H200 (benchmarks/results/2026-11-30-h200-c and -d): bulk copies read the 7B
shapes no faster than 128-bit loads; issued all at once, the qkv GEMV's 28 MB delayed the norm
ahead of it by 4.3 us a call (its loads queued behind them) for 2.2 us saved, 0.95x. With 3
chunks of 8 features in flight (depth 3) for qkv and 2 for o_proj, released at the attention's
start: 1.02x in three interleaved A/Bs; with the GLU mode too (2 chunks in flight; 3 gave
1.00x): 1.05x (1.03x over the two alone) in two, 658.9 against 627.9 tok/s in run_h200.py. The
7B logits are bit for bit the shipped GEMVs' (one K slice adds the same integer terms in the
same order).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcc.backends.cuda.chain import HELPERS
from mlcc.backends.cuda.decode_attention import use_decode
from mlcc.backends.cuda.gemv import SMS
from mlcc.backends.cuda.intdot import DP2A_SOURCE, dp2a_group, stage_dp2a
from mlcc.backends.cuda.kernels import GRID_WAIT, CudaKernel, launcher, signature
from mlcc.backends.cuda.linear import LinearShape, gemv_q4_applies
from mlcc.backends.plan import EntryPlan, KernelCall, KernelSpec
from mlcc.errors import MlccError

ATTR = "tma_gemv"
# The attribute's value: where the marked call sits
BEHIND_LIGHT = 1  # behind a latency-bound kernel, which releases it early
BEHIND_GLU = 2  # behind the gate_up + silu_mul GEMV, released when that ends
BEHIND_FOLD = 3  # behind a GEMV that a norm was folded into (norm_fold), released at its start
STREAM_WARPS = 16  # consumer warps of a GEMV behind the GLU (stream_config)
MAX_SMEM = 232448  # dynamic shared memory one block may have on sm_90
ONE_PER_SM = MAX_SMEM // 2 + 1024  # shared memory that leaves no room for a second block
SM_SMEM = 233472  # shared memory of an sm_90 SM, of which the driver keeps 1 KB a block
BLOCK_RESERVED = 1024
MAX_LANE_GROUPS = 4  # groups whose staged activations a lane keeps in registers


@dataclass(frozen=True)
class TmaConfig:
    """`ks` K slices x `teams` feature teams = warps; `chunk` features a copy (a multiple of
    `teams`); `early` chunks issued before the grid wait (None: all). With `depth` > 0 an extra
    warp issues the copies instead, never waiting for the kernel ahead: chunk c once chunk
    c - depth has landed, so at most `depth` chunks a block are in flight (`early` unused)."""

    ks: int = 1
    teams: int = 8
    chunk: int = 16
    early: int | None = None
    stream_only: bool = False  # a timing probe: copy the weights and stop (wrong results)
    depth: int = 0

    @property
    def warps(self) -> int:
        return self.ks * self.teams


def stream_config(s: LinearShape, sms: int = SMS) -> TmaConfig:
    """The configuration behind the GLU GEMV (BEHIND_GLU): default_config's K slices, chunks
    and depth with STREAM_WARPS consumer warps. Nothing hides the consumers there: on the 7B
    down GEMV its copies alone add 233 us a decode step, 8 consumer warps 365 and 16 warps 306
    (benchmarks/results/2026-11-30-h200-e)."""
    c = default_config(s, sms)
    teams = STREAM_WARPS // c.ks
    return TmaConfig(c.ks, teams, max(c.chunk, teams), depth=c.depth)


def config_of(spec: KernelSpec) -> TmaConfig:
    """The configuration `mark` chose for this call's place."""
    s = LinearShape(spec)
    return stream_config(s) if dict(spec.attrs).get(ATTR) == BEHIND_GLU else default_config(s)


def default_config(s: LinearShape, sms: int = SMS) -> TmaConfig:
    """The fewest K slices (of 1, 2, 4, 8) that keep a lane's groups within MAX_LANE_GROUPS;
    8 warps and a producer; chunks of 8 features, 3 in flight, 2 where a block has at most 48
    features (the 7B o_proj's 32: 5.18 us standalone against 5.47 with 3; qkv's 94: 9.31
    against 9.53 with 2; benchmarks/results/2026-11-30-h200-d)."""
    groups = s.k // 32
    depth = 3 if -(-s.n // sms) > 48 else 2
    for ks in (1, 2, 4, 8):
        if groups % ks == 0 and -(-groups // ks // 32) <= MAX_LANE_GROUPS:
            return TmaConfig(ks, 8 // ks, 8, depth=depth)
    return TmaConfig(8, 1, 8, depth=depth)


@dataclass(frozen=True)
class Layout:
    rows: int  # features a block
    weights: int  # byte offsets in dynamic shared memory
    scales: int
    xs: int
    xg: int
    red: int
    bars: int
    total: int
    res: int = 0  # with a residual (a folded norm's producer): the block's residual values
    sq: int = 0  # ... and each warp's sum of squares


def _align(v: int, a: int = 16) -> int:
    return -(-v // a) * a


def layout(s: LinearShape, cfg: TmaConfig, sms: int = SMS, residual: bool = False) -> Layout:
    rows = -(-s.n // sms)
    w_row, s_row = s.words * 4, s.groups * 2
    weights = 0
    scales = _align(weights + rows * w_row)
    xs = _align(scales + rows * s_row)
    xg = _align(xs + s.k * 2)
    red = _align(xg + s.groups * 8)
    bars = _align(red + (rows * cfg.ks * 4 if cfg.ks > 1 else 0), 8)
    chunks = -(-rows // cfg.chunk)
    end, res, sq = bars + chunks * 8, 0, 0
    if residual:
        res = _align(end)
        sq = _align(res + rows * 2)
        end = sq + cfg.warps * 4
    # at least half an SM's shared memory: one block an SM, wherever the grid is placed
    return Layout(rows, weights, scales, xs, xg, red, bars, max(end, ONE_PER_SM), res, sq)


def blocks(s: LinearShape, cfg: TmaConfig) -> int:
    """The kernel's blocks: a folded norm's producer writes one partial sum of squares each."""
    return -(-s.n // layout(s, cfg).rows)


def fits(s: LinearShape, cfg: TmaConfig | None = None, residual: bool = False) -> bool:
    """Whether the TMA GEMV applies to `s` (a one-row q4 GEMV whose slice fits a block; with
    `residual`, beside the residual values and sums of a folded norm's producer)."""
    if not gemv_q4_applies(s) or s.static_rows != 1:
        return False
    cfg = cfg or default_config(s)
    groups = s.k // 32
    if groups % cfg.ks or cfg.chunk % cfg.teams or -(-groups // cfg.ks // 32) > MAX_LANE_GROUPS:
        return False
    # bulk copies move multiples of 16 bytes from 16-byte aligned addresses
    if (s.words * 4) % 16 or (s.groups * 2) % 16:
        return False
    return layout(s, cfg, residual=residual).total <= MAX_SMEM


# Calls whose kernel is latency-bound and reads no weight matrix: a GEMV behind one is marked.
LIGHT_AHEAD = frozenset({"rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"})


def light(spec: KernelSpec) -> bool:
    """Whether a GEMV behind this call gets the TMA kernel: a one-row norm, or the decode
    attention (whose kernel then releases the GEMV at its start: codegen.early_release)."""
    return spec.op in LIGHT_AHEAD or (spec.op == "qkv_attention" and use_decode(spec))


# Whether the gate_up + silu_mul GEMV behind a norm takes the GLU mode (off: the persistent GEMV)
TMA_GLU = True
# Whether the GEMV behind the gate_up + silu_mul GEMV (down) takes the TMA GEMV (BEHIND_GLU)
TMA_BEHIND_GLU = True


def takes(spec: KernelSpec) -> bool:
    """Whether this call's kernel can be the TMA GEMV (plain, or the GLU mode with TMA_GLU)."""
    from mlcc.backends.cuda import glu

    if spec.op == "q_linear":
        return fits(LinearShape(spec))
    return (TMA_GLU and spec.op == glu.OP and dict(spec.attrs).get(glu.WEIGHTS_ATTR) == "q4"
            and glu_fits(LinearShape(glu.linear_spec(spec))))


def behind_glu(ahead: KernelSpec, spec: KernelSpec) -> bool:
    """Whether this call is a plain one-row GEMV right behind the gate_up + silu_mul GEMV that
    fits the TMA GEMV with stream_config (with TMA_BEHIND_GLU)."""
    from mlcc.backends.cuda import glu

    if not TMA_BEHIND_GLU or ahead.op != glu.OP or spec.op != "q_linear":
        return False
    s = LinearShape(spec)
    return fits(s, stream_config(s))


def mark(plan: EntryPlan) -> EntryPlan:
    """The plan with every one-row q4 GEMV that fits and follows a `light` call marked
    BEHIND_LIGHT, and every one behind the GLU GEMV marked BEHIND_GLU."""
    calls = []
    for i, call in enumerate(plan.calls):
        spec = call.spec
        kind = None
        if ATTR not in dict(spec.attrs) and i > 0:
            ahead = plan.calls[i - 1].spec
            if light(ahead) and takes(spec):
                kind = BEHIND_LIGHT
            elif behind_glu(ahead, spec):
                kind = BEHIND_GLU
        if kind is not None:
            spec = KernelSpec(spec.op, spec.inputs, spec.outputs, spec.attrs + ((ATTR, kind),),
                              spec.kv)
            call = KernelCall(spec, call.buffers)
        calls.append(call)
    return EntryPlan(plan.name, plan.args, calls, plan.workspace_bytes, plan.symbols,
                     plan.bounds)


def room_beside(spec: KernelSpec) -> int:
    """Static shared memory a block of another kernel may have to sit beside a block of this
    marked GEMV on one SM (the consumer of a folded norm: as its own GEMV's)."""
    from mlcc.backends.cuda import norm_fold

    spec = norm_fold.own_spec(spec)
    lay = layout(LinearShape(spec), config_of(spec))
    return SM_SMEM - (lay.total + BLOCK_RESERVED) - BLOCK_RESERVED


def marked(spec: KernelSpec) -> bool:
    """Whether `mark` gave this call's spec the TMA GEMV."""
    return bool(dict(spec.attrs).get(ATTR))


def released_early(spec: KernelSpec) -> bool:
    """Whether the kernel ahead of this call releases it early (codegen.early_release): the
    GEMVs behind a latency-bound kernel, and the consumers of a folded norm (qkv, the GLU
    GEMV) behind its producer (down, o_proj), whose blocks then take the SMs as the producer's
    blocks leave (1.037x in the 7B decode against a release at the producer's end:
    benchmarks/results/2026-11-30-h200-i); not the GEMV behind the GLU GEMV, whose tail its
    copies would only slow."""
    return dict(spec.attrs).get(ATTR) in (BEHIND_LIGHT, BEHIND_FOLD)


def gemv_tma_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    if spec.op != "q_linear" or not marked(spec):
        return None
    s, cfg = LinearShape(spec), config_of(spec)
    return gemv_tma_kernel(s, name, cfg) if fits(s, cfg) else None


def gemv_tma_kernel(s: LinearShape, name: str, cfg: TmaConfig | None = None,
                    residual: bool = False, norm=None, buffers: list | None = None
                    ) -> CudaKernel:
    """The TMA GEMV of `s`. A folded norm (mlcc.backends.cuda.norm_fold) gives two forms:
    - `residual` (its producer): buffers s.buffers[:-1] + [res, sum_out, ssq]; each result,
      rounded to float16 as y would be, plus the residual is stored rounded as add_rms_norm
      rounds its sum, and block b stores the float32 sum of squares of its stored sums in
      ssq[b] (the warps' sums added in warp order);
    - `norm` (a RowNorm; its consumer): `buffers` x (the sums), ssq, nw, then s.buffers[1:];
      the row is normalized as it is staged."""
    cfg = cfg or default_config(s)
    lay = layout(s, cfg, residual=residual)
    groups, words = s.k // 32, s.words
    gs = groups // cfg.ks  # groups of a K slice
    it_n = -(-gs // 32)
    chunks = -(-lay.rows // cfg.chunk)
    early = chunks if cfg.early is None else min(cfg.early, chunks)
    if cfg.depth:
        early = 0
    per_team = cfg.chunk // cfg.teams
    threads = cfg.warps * 32
    # the consumers' barrier: a named one when the producer warp does not take part
    sync = f"mlcc_chain_sync(1, {threads});" if cfg.depth else "__syncthreads();"
    w_row, s_row = words * 4, s.groups * 2

    def copy(c: str) -> str:
        """The bulk copies of chunk `c` (a C++ expression), completing on its mbarrier."""
        return f"""{{
      const int f0 = {c} * {cfg.chunk}, rows = min({cfg.chunk}, nrows - f0);
      const unsigned bar = bars + 8 * ({c});
      mlcc_chain_expect(bar, (unsigned)rows * {w_row + s_row}u);
      mlcc_chain_copy(mlcc_chain_smem(smem + {lay.weights} + (size_t)f0 * {w_row}),
                      qw + (n0 + f0) * {words}LL, (unsigned)rows * {w_row}u, bar);
      mlcc_chain_copy(mlcc_chain_smem(smem + {lay.scales} + (size_t)f0 * {s_row}),
                      qs + (n0 + f0) * {s.groups}LL, (unsigned)rows * {s_row}u, bar);
    }}"""

    def issue(first: str, last: str) -> str:
        return f"""    for (int c = {first}; c < {last}; ++c) {copy("c")}"""

    late = ""
    if early < chunks and not cfg.depth:
        late = f"""
  if (threadIdx.x == 0) {{
{issue(str(early), "nchunks")}
  }}"""
    def add_residual(f: str, total: str) -> str:
        """Store the sum of feature `f`'s result and its residual, count its square in sq."""
        return f"""{{
          const half result = __float2half({total}{s.bias_term(f"n0 + {f}")});
          const half sum = __float2half(__half2float(result) + __half2float(rsm[{f}]));
          sum_out[n0 + {f}] = sum;
          sq += __half2float(sum) * __half2float(sum);
        }}"""

    if cfg.ks == 1:
        bias = s.bias_term("n0 + f")
        emit = f"""        if (lane == 0 && f < nrows) mlcc_put(y, n0 + f, total{bias});"""
        if residual:
            emit = f"""        if (lane == 0 && f < nrows) {add_residual("f", "total")}"""
        finish = ""
    else:
        # features past the block's rows (a last chunk that is not full) have no slot in red,
        # which the mbarriers follow
        emit = """        if (lane == 0 && f < nrows) red[f * KS + slice] = total;"""
        finish = f"""
  {sync}
  for (int f = threadIdx.x; f < nrows; f += {threads}) {{
    float total = 0.f;
    #pragma unroll
    for (int t = 0; t < KS; ++t) total += red[f * KS + t];
    {add_residual("f", "total") if residual else f'mlcc_put(y, n0 + f, total{s.bias_term("n0 + f")});'}
  }}"""
    probe = ""
    if cfg.stream_only:
        probe = f"""
  {late.strip()}
  for (int c = 0; c < nchunks; ++c) mlcc_chain_wait(bars + 8 * c, 0u);
  return 0;"""
    first = "\n" + issue("0", f"min(nchunks, {early})") if early else ""
    producer = ""
    if cfg.depth:
        producer = f"""
  __syncthreads();  // the barriers are initialized
  if (warp == {cfg.warps}) {{  // the producer: the weights need nothing from the kernel before
    if (lane == 0) {{
      for (int c = 0; c < nchunks; ++c) {{
        if (c >= {cfg.depth}) mlcc_chain_wait(bars + 8 * (c - {cfg.depth}), 0u);
        {copy("c")}
      }}
    }}
    return 0;
  }}"""
        if cfg.stream_only:
            probe = """
  for (int c = 0; c < nchunks; ++c) mlcc_chain_wait(bars + 8 * c, 0u);
  return 0;"""
    buffers = buffers or s.buffers
    outputs = ("y",)
    res_load, sums = "", ""
    if residual:
        buffers = s.buffers[:-1] + [("res", s.yshape, s.ydt), ("sum_out", s.yshape, s.ydt),
                                    ("ssq", (1, blocks(s, cfg)), "float32")]
        outputs = ("sum_out", "ssq")
        # the residual was written before the kernel ahead ran: loaded after the wait
        res_load = f"""
  half* rsm = reinterpret_cast<half*>(smem + {lay.res});
  float* sqs = reinterpret_cast<float*>(smem + {lay.sq});
  if (threadIdx.x < nrows) rsm[threadIdx.x] = res[n0 + threadIdx.x];
  float sq = 0.f;"""
        sq_total = "" if cfg.ks == 1 else "\n  sq = mlcc_warp_sum(sq);"
        sums = f"""{sq_total}
  if (lane == 0) sqs[warp] = sq;
  {sync}
  if (threadIdx.x == 0) {{
    float part = 0.f;
    for (int v = 0; v < {cfg.warps}; ++v) part += sqs[v];
    ssq[blockIdx.x] = part;
  }}"""
        if lay.rows > cfg.warps * 32:
            raise MlccError("compile", f"{name}: {lay.rows} residual values a block need "
                            f"more than its {cfg.warps * 32} threads")
    sig = signature(name, buffers, outputs, s.symbols)
    sig = sig[:-1] + ", unsigned char* __restrict__ smem)"
    body = f"""{DP2A_SOURCE}{HELPERS}{sig} {{
  constexpr int KS = {cfg.ks};
  half2* xs = reinterpret_cast<half2*>(smem + {lay.xs});
  int2* xg = reinterpret_cast<int2*>(smem + {lay.xg});
  float* red = reinterpret_cast<float*>(smem + {lay.red});
  const uint4* wsm = reinterpret_cast<const uint4*>(smem + {lay.weights});
  const half* ssm = reinterpret_cast<const half*>(smem + {lay.scales});
  const unsigned bars = mlcc_chain_smem(smem + {lay.bars});
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slice = warp % KS, team = warp / KS;
  const long long n0 = (long long)blockIdx.x * {lay.rows};
  const int nrows = (int)min((long long){lay.rows}, {s.n}LL - n0);
  const int nchunks = (nrows + {cfg.chunk - 1}) / {cfg.chunk};
  (void)red;
  if (threadIdx.x == 0) {{
    for (int c = 0; c < nchunks; ++c)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bars + 8 * c) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");{first}
  }}{producer}
  {GRID_WAIT}  // the weights above need nothing from the kernel before{probe}
  const int r = 0;{res_load}
{stage_dp2a(s.k, cfg.warps, norm=norm)}
  {sync}{late}
{_lane_row(gs, f"slice * {gs}")}
  for (int c = 0; c < nchunks; ++c) {{
    mlcc_chain_wait(bars + 8 * c, 0u);
    #pragma unroll
    for (int q = 0; q < {per_team}; ++q) {{
      const int f = c * {cfg.chunk} + team + {cfg.teams} * q;
      float acc = 0.f;
      if (f < nrows) {{
        const uint4* wr = wsm + (size_t)f * {groups};
        const half* sr = ssm + (size_t)f * {s.groups};
        #pragma unroll
        for (int it = 0; it < {it_n}; ++it) {{
          const int gl = lane + 32 * it;
          if (gl < {gs}) {{
            const int g = slice * {gs} + gl;
            const uint4 v = wr[g];
            acc += ({dp2a_group("v", tuple(f"xa[it][{j}]" for j in range(4)), "zf[it]")})
                   * __half2float(sr[g]);
          }}
        }}
      }}
      const float total = mlcc_warp_sum(acc);
{emit}
    }}
  }}{finish}{sums}
  return 0;
}}
"""
    threads += 32 if cfg.depth else 0
    return _kernel(name, body, buffers, -(-s.n // lay.rows), threads, s.symbols, lay.total)


def _kernel(name: str, body: str, buffers: list, blocks: int, threads: int, symbols: list[str],
            smem: int) -> CudaKernel:
    """The kernel of `body` (whose device function takes the dynamic shared memory last) with
    a launcher of `blocks` blocks that gives each `smem` bytes of it, one block an SM."""
    text = launcher(name, buffers, (f"T.int64({blocks})",), threads, symbols)
    call = f'T.evaluate(T.call_extern("int32", "{name}_dev", '
    head, sep, rest = text.rpartition(call)
    indent = head[head.rfind("\n") + 1:]
    text = (head + f'smem = T.alloc_buffer(({smem},), "uint8", scope="shared.dyn")\n'
            + indent + sep + rest.replace("))", ", smem.data))", 1))
    return CudaKernel(name, body, text, min_blocks=1)


def _lane_row(groups: int, first: str = "0") -> str:
    """Lane l's staged activations of groups first + l, first + l + 32, ... (of `groups`) into
    registers xa and zf, zero past the end."""
    it_n = -(-groups // 32)
    return f"""  uint4 xa[{it_n}][4];
  int2 zf[{it_n}];
  #pragma unroll
  for (int it = 0; it < {it_n}; ++it) {{
    const int gl = lane + 32 * it;
    const int g = {first} + gl;
    #pragma unroll
    for (int j = 0; j < 4; ++j)
      xa[it][j] = gl < {groups} ? reinterpret_cast<const uint4*>(xs)[g * 4 + j]
                               : make_uint4(0u, 0u, 0u, 0u);
    zf[it] = gl < {groups} ? xg[g] : make_int2(0, 0);
  }}"""


# --- GLU mode: gate_up + silu_mul through a ring of slots ------------------------------------

GLU_CHUNK = 8  # features a chunk (their gate and up rows): one a consumer warp
GLU_DEPTH = 2  # chunks a block in flight (2: 14.19 us standalone against 14.55 with 3)


@dataclass(frozen=True)
class GluLayout:
    rows: int  # features a block
    slots: int
    slot: int  # bytes of a slot: gate rows, up rows, gate scales, up scales
    xs: int
    xg: int
    full: int
    empty: int
    total: int


def glu_layout(s: LinearShape, sms: int = SMS) -> GluLayout:
    """As many slots of GLU_CHUNK features as fit beside the staged row, at most 8."""
    rows = -(-(s.n // 2) // sms)
    w_row, s_row = s.words * 4, s.groups * 2
    slot = GLU_CHUNK * 2 * (w_row + s_row)
    tail = _align(s.k * 2) + _align(s.groups * 8) + 16 * 8
    slots = min(8, (MAX_SMEM - tail) // slot)
    xs = slots * slot
    xg = _align(xs + s.k * 2)
    full = _align(xg + s.groups * 8, 8)
    empty = full + slots * 8
    return GluLayout(rows, slots, slot, xs, xg, full, empty, max(empty + slots * 8, ONE_PER_SM))


def glu_fits(s: LinearShape) -> bool:
    """Whether the GLU mode applies: a one-row q4 gate_up (N = 2I, float16 values) whose K
    puts a lane's groups in registers with one K slice, with room for GLU_DEPTH slots."""
    if not gemv_q4_applies(s) or s.static_rows != 1 or s.n % 2 or s.ydt != "float16":
        return False
    if -(-(s.k // 32) // 32) > MAX_LANE_GROUPS or (s.words * 4) % 16 or (s.groups * 2) % 16:
        return False
    return glu_layout(s).slots >= GLU_DEPTH


def gemv_tma_glu_kernel(s: LinearShape, name: str, glu: str, depth: int = GLU_DEPTH,
                        stream_only: bool = False, norm=None, buffers: list | None = None
                        ) -> CudaKernel:
    """y[f] = glu(g_f, u_f) for the gate rows f and up rows I + f of a q4 gate_up weight: a
    producer warp streams each block's chunks (the gate and up rows of GLU_CHUNK features)
    through a ring of shared-memory slots, at most `depth` in flight, never waiting for the
    kernel ahead; each consumer warp takes one feature of a chunk (the integer dot, as the
    plain mode with one K slice), rounds g and u to float16 as the unfused GEMV stores them,
    and releases the slot. With `norm` (a RowNorm, the consumer of a folded norm:
    mlcc.backends.cuda.norm_fold) `buffers` are x (the sums), ssq, nw and glu_buffers' rest,
    and the row is normalized as it is staged."""
    from mlcc.backends.cuda.gemv import glu_buffers

    lay = glu_layout(s)
    if not glu_fits(s) or not 1 <= depth <= lay.slots:
        raise MlccError("compile", f"{name}: the TMA GEMV's GLU mode does not take a gate_up "
                        f"of {s.n} x {s.k} with {depth} chunks in flight")
    warps, threads = GLU_CHUNK, GLU_CHUNK * 32
    groups, words, half_n = s.k // 32, s.words, s.n // 2
    it_n = -(-groups // 32)
    w_row, s_row = words * 4, s.groups * 2
    buffers = buffers or glu_buffers(s)
    gate = f"__half2float(__float2half(g{s.bias_term('fb + f')}))"
    up = f"__half2float(__float2half(u{s.bias_term(f'fb + f + {half_n}')}))"
    probe = """
  for (int c = 0; c < nchunks; ++c) {  // the copies alone: take each chunk, free its slot
    mlcc_chain_wait(full + 8 * (c % SLOTS), (c / SLOTS) & 1);
    __syncwarp();
    if (lane == 0) mlcc_chain_arrive(empty + 8 * (c % SLOTS));
  }
  return 0;""" if stream_only else ""
    sig = signature(name, buffers, ("y",), s.symbols)
    sig = sig[:-1] + ", unsigned char* __restrict__ smem)"
    body = f"""{DP2A_SOURCE}{HELPERS}{sig} {{
  constexpr int SLOTS = {lay.slots}, SLOT = {lay.slot}, CHUNK = {GLU_CHUNK};
  half2* xs = reinterpret_cast<half2*>(smem + {lay.xs});
  int2* xg = reinterpret_cast<int2*>(smem + {lay.xg});
  const unsigned full = mlcc_chain_smem(smem + {lay.full});
  const unsigned empty = mlcc_chain_smem(smem + {lay.empty});
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long fb = (long long)blockIdx.x * {lay.rows};  // the block's first feature
  const int nrows = (int)min((long long){lay.rows}, {half_n}LL - fb);
  const int nchunks = (nrows + CHUNK - 1) / CHUNK;
  if (threadIdx.x == 0) {{
    for (int i = 0; i < SLOTS; ++i) {{
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(full + 8 * i) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], {warps};" ::"r"(empty + 8 * i)
                   : "memory");
    }}
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }}
  __syncthreads();  // the barriers are initialized
  if (warp == {warps}) {{  // the producer: the weights need nothing from the kernel before
    if (lane == 0) {{
      for (int c = 0; c < nchunks; ++c) {{
        const int slot = c % SLOTS, round = c / SLOTS;
        if (round > 0) mlcc_chain_wait(empty + 8 * slot, (round - 1) & 1);
        if (c >= {depth}) mlcc_chain_wait(full + 8 * ((c - {depth}) % SLOTS),
                                          ((c - {depth}) / SLOTS) & 1);
        const int f0 = c * CHUNK, rows = min(CHUNK, nrows - f0);
        const unsigned bar = full + 8 * slot, dst = mlcc_chain_smem(smem + (size_t)slot * SLOT);
        mlcc_chain_expect(bar, (unsigned)rows * {2 * (w_row + s_row)}u);
        mlcc_chain_copy(dst, qw + (fb + f0) * {words}LL, (unsigned)rows * {w_row}u, bar);
        mlcc_chain_copy(dst + CHUNK * {w_row}, qw + ({half_n}LL + fb + f0) * {words}LL,
                        (unsigned)rows * {w_row}u, bar);
        mlcc_chain_copy(dst + 2 * CHUNK * {w_row}, qs + (fb + f0) * {s.groups}LL,
                        (unsigned)rows * {s_row}u, bar);
        mlcc_chain_copy(dst + 2 * CHUNK * {w_row} + CHUNK * {s_row},
                        qs + ({half_n}LL + fb + f0) * {s.groups}LL, (unsigned)rows * {s_row}u,
                        bar);
      }}
    }}
    return 0;
  }}
  {GRID_WAIT}  // the weights above need nothing from the kernel before{probe}
  const int r = 0;
{stage_dp2a(s.k, warps, norm=norm)}
  mlcc_chain_sync(1, {threads});
{_lane_row(groups)}
  for (int c = 0; c < nchunks; ++c) {{
    const int slot = c % SLOTS;
    mlcc_chain_wait(full + 8 * slot, (c / SLOTS) & 1);
    const unsigned char* base = smem + (size_t)slot * SLOT;
    const int f = c * CHUNK + warp;
    float g = 0.f, u = 0.f;
    if (f < nrows) {{
      const uint4* wg = reinterpret_cast<const uint4*>(base) + (size_t)warp * {groups};
      const uint4* wu = reinterpret_cast<const uint4*>(base + CHUNK * {w_row})
                        + (size_t)warp * {groups};
      const half* sg = reinterpret_cast<const half*>(base + 2 * CHUNK * {w_row}) + warp * {s.groups};
      const half* su = reinterpret_cast<const half*>(base + 2 * CHUNK * {w_row} + CHUNK * {s_row})
                       + warp * {s.groups};
      #pragma unroll
      for (int it = 0; it < {it_n}; ++it) {{
        const int gi = lane + 32 * it;
        if (gi < {groups}) {{
          const uint4 vg = wg[gi], vu = wu[gi];
          g += ({dp2a_group("vg", tuple(f"xa[it][{j}]" for j in range(4)), "zf[it]")})
               * __half2float(sg[gi]);
          u += ({dp2a_group("vu", tuple(f"xa[it][{j}]" for j in range(4)), "zf[it]")})
               * __half2float(su[gi]);
        }}
      }}
    }}
    g = mlcc_warp_sum(g);
    u = mlcc_warp_sum(u);
    __syncwarp();
    if (lane == 0) {{
      mlcc_chain_arrive(empty + 8 * slot);
      if (f < nrows) {{
        const float gr = {gate}, ur = {up};
        mlcc_put(y, fb + f, {glu.format(g="gr", u="ur")});
      }}
    }}
  }}
  return 0;
}}
"""
    return _kernel(name, body, buffers, -(-half_n // lay.rows), threads + 32, s.symbols,
                   lay.total)
