"""The peak memory of a job, estimated from the plan before anything runs.

A job's peak is its weights plus the largest of its phases (a source pass, the clean pass, the
patched passes, a training step, ...), each phase being what the op keeps across passes (cached
clean-prefix outputs, source values, clean logits, frozen path-patching values, DAS's captured
site values) plus its largest pass: the layer temporaries of ``rows`` rows, the copies its writes
make, its logits (at the scored positions, or everywhere where an op computes them all) and, for
ops that take gradients, the activations autograd saves and the gradients of the backward pass.

Figures are live tensor bytes: what ``torch.cuda.max_memory_allocated`` counts on a GPU, and the
resident set on CPU when glibc unmaps freed blocks (``MALLOC_MMAP_THRESHOLD_=131072``). The
per-token constants were measured on GPT-2 (Hugging Face, fp32), and
``tests/benchmarks/memory_plan.py`` checks every kind against measured peaks on a GPT-2-small-
sized config. On CPU, worker processes recycle freed blocks in their heap instead
(``execute/allocator.py``), so their resident set ends above the live peak, by amounts that vary
from run to run: 1.1-1.9x for most kinds in that benchmark, up to 3x for causal tracing and 5x
for causal scrubbing (each new pass shape grows the fragmented heap). ``device="cpu"`` adds an
``allocator`` share of 0.6x the live peak, so a plan fitted to a CPU worker's memory leaves
that much room.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from mi_spec.errors import ExecutionError
from mi_spec.plan.ir import Intervention, Job, Plan, Variant

GiB = 2**30
ALLOCATOR = 0.6  # CPU: the resident set above the live tensors, as a share of them (see above)
DAS_CACHE = 1 << 30  # das_op.CACHE_BYTES: cached base outputs above this are not kept
# live elements per row and token at a no-grad layer's peak: residual-width tensors (the stream,
# its norm, q/k/v, attention output, ...) and MLP-width ones (the hidden layer, two temporaries)
FWD_RESID, FWD_MLP = 9, 3
# elements per row, token and layer that autograd saves for the backward pass
GRAD_RESID, GRAD_MLP = 6, 4
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class MemoryLimitError(ExecutionError):
    """A job's estimated peak does not fit the runner's memory, even at its smallest passes."""


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know of a model beyond ``plan.dims``."""

    weight_bytes: int  # parameters and buffers, on the device
    d_mlp: int  # the MLP's hidden width
    dtype_bytes: int  # bytes per activation element (the model's dtype)
    eager_attention: bool = False  # attention scores [rows, heads, T, T] are materialized

    @classmethod
    def guess(cls, plan: Plan) -> ModelSize:
        """From ``plan.dims`` and the model section alone (no module at hand): a GPT-style
        model with an MLP four times as wide and untied embeddings."""
        d, b = plan.dims, _BYTES.get(plan.model.section.get("dtype", "float32"), 4)
        config = plan.model.section.get("hf_config") or {}
        d_mlp = _config_mlp(config) or 4 * d["d_model"]
        per_layer = 4 * d["d_model"] ** 2 + 2 * d["d_model"] * d_mlp
        params = d["n_layers"] * per_layer + 2 * d["d_vocab"] * d["d_model"]
        return cls(params * b, d_mlp, b)


def model_size(module: Any, plan: Plan) -> ModelSize:
    """The size of ``module`` (loaded, or a meta-device skeleton): its parameters and buffers,
    its MLP width (the config's, else the widest MLP weight; 0 without an MLP) and whether its
    attention is eager."""
    tensors = [*module.parameters(), *module.buffers()]
    weight = sum(t.numel() * t.element_size() for t in tensors)
    config = getattr(module, "config", None)
    d_mlp = _config_mlp(config.to_dict() if hasattr(config, "to_dict") else {})
    if d_mlp is None:
        d = plan.dims["d_model"]
        mlp = re.compile(r"(^|\.)(mlp|ffn|feed_forward|fc\d*)(\.|$)")
        sizes = [
            n
            for name, p in module.named_parameters()
            if p.dim() == 2 and mlp.search(name)
            for n in p.shape
            if n != d
        ]
        d_mlp = max(sizes, default=0)
    attn = getattr(config, "_attn_implementation", None) or "eager"
    dtype = next((t.element_size() for t in tensors if t.is_floating_point()), 4)
    return ModelSize(weight, d_mlp, dtype, attn == "eager")


def _config_mlp(config: dict[str, Any]) -> int | None:
    for key in ("n_inner", "intermediate_size", "ffn_dim", "d_ff", "mlp_dim"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


@dataclass(frozen=True)
class JobMemory:
    """A job's estimated peak, in bytes, split by what holds it (at the peak's phase)."""

    weights: int
    kept: int  # held across the job's passes
    activations: int  # the largest pass's layer temporaries (beyond its logits)
    logits: int  # that pass's logits and their log-softmax
    gradients: int  # saved activations and gradients of a backward pass
    allocator: int  # CPU: freed temporaries glibc keeps resident
    rows: int  # rows of the job's largest pass
    phase: str  # the phase that peaks

    @property
    def job(self) -> int:
        """The job's own peak, weights excluded (what its worker's memory grows by)."""
        return self.kept + self.activations + self.logits + self.gradients + self.allocator

    @property
    def total(self) -> int:
        return self.weights + self.job

    def parts(self) -> dict[str, int]:
        """The non-zero parts, weights first."""
        names = [f.name for f in fields(self) if f.name not in ("rows", "phase")]
        return {n: getattr(self, n) for n in names if getattr(self, n)}

    def describe(self) -> str:
        """``peak ~1.23 GiB per worker (weights 0.47, kept 0.12, ...; 64 rows a pass, phase)``:
        GiB from 1 GiB on, MiB below."""
        unit, scale, digits = ("GiB", GiB, 2) if self.total >= GiB else ("MiB", 2**20, 0)
        parts = ", ".join(f"{k} {v / scale:.{digits}f}" for k, v in self.parts().items())
        peak = f"{self.total / scale:.{digits}f} {unit}"
        rows = f"{self.rows} row{'s' if self.rows != 1 else ''} a pass"
        return f"peak ~{peak} per worker ({parts}; {rows}, {self.phase})"


def _size(n: int) -> str:
    """``1.23 GiB``, ``456 MiB``, ``64 KiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.0f} {unit}"
    return f"{n / 1024:.0f} KiB"


@dataclass(frozen=True)
class _Shape:
    """Everything the formulas read: sizes, sequence length, scored positions, bytes, rows."""

    layers: int
    heads: int
    d: int
    vocab: int
    mlp: int
    seq: int
    scored: int  # positions the metric scores per row
    b: int
    eager: bool
    max_rows: int

    def u(self, rows: int, width: int | None = None) -> int:
        """Bytes of ``rows`` rows of activations ``width`` (default d_model) wide."""
        return rows * self.seq * (width or self.d) * self.b

    def logits(self, rows: int, positions: int, scored: bool = True) -> int:
        """Logits at ``positions`` per row and, when ``scored``, the fp32 log-softmax at the
        scored ones (and a float copy when the model is not fp32)."""
        out = rows * positions * self.vocab * self.b
        if scored and positions:
            out += rows * min(positions, self.scored) * self.vocab * (8 if self.b != 4 else 4)
        return out

    def forward(self, rows: int) -> int:
        """The layer temporaries of one no-grad pass of ``rows`` rows."""
        scores = 2 * rows * self.heads * self.seq**2 * self.b if self.eager else 0
        return FWD_RESID * self.u(rows) + FWD_MLP * self.u(rows, self.mlp) + scores

    def backward(self, rows: int, layers: int, positions: int | None = None) -> int:
        """A gradient pass through the top ``layers`` layers with logits at ``positions`` per
        row (None: every position): the activations autograd saves, the logits, their
        log-softmax at the scored positions and the logits' gradient, and one layer's
        gradients in flight."""
        saved = layers * (GRAD_RESID * self.u(rows) + GRAD_MLP * self.u(rows, self.mlp))
        logits = rows * (self.seq if positions is None else positions) * self.vocab
        soft = rows * self.scored * self.vocab * 4
        return saved + logits * (self.b + 4) + soft + 4 * self.u(rows)


@dataclass(frozen=True)
class _Phase:
    name: str
    kept: int = 0
    act: int = 0
    logits: int = 0
    grads: int = 0
    rows: int = 0

    @property
    def total(self) -> int:
        return self.kept + self.act + self.logits + self.grads


def _pass(
    name: str,
    s: _Shape,
    rows: int,
    kept: int = 0,
    positions: int | None = None,
    scored: bool = True,
    writes: int = 0,
) -> _Phase:
    """A no-grad pass of ``rows`` rows over what the op keeps: its peak is the larger of the
    layer temporaries (plus the copies its ``writes`` make) and its logits (``positions`` per
    row, None: the scored ones) with the last hidden states."""
    logits = s.logits(rows, s.scored if positions is None else positions, scored)
    peak = max(s.forward(rows) + writes, logits + 2 * s.u(rows))
    return _Phase(name, kept, peak - logits, logits, 0, rows)


Estimator = Callable[[Plan, Job, _Shape], list[_Phase]]
_ESTIMATORS: dict[str, Estimator] = {}


def register_memory(op: str) -> Callable[[Estimator], Estimator]:
    """Register the phases of job op ``op`` (what it keeps, its passes)."""

    def deco(fn: Estimator) -> Estimator:
        _ESTIMATORS[op] = fn
        return fn

    return deco


def estimate_job(
    plan: Plan,
    job: Job,
    size: ModelSize | None = None,
    max_rows: int | None = None,
    device: str = "cpu",
) -> JobMemory:
    """The peak of ``job`` with at most ``max_rows`` rows a pass (default: the plan's), on
    ``device`` (``cpu`` adds the allocator's share)."""
    size = size or ModelSize.guess(plan)
    d = plan.dims
    shape = _Shape(
        layers=d["n_layers"],
        heads=d["n_heads"],
        d=d["d_model"],
        vocab=d["d_vocab"],
        mlp=size.d_mlp,
        seq=max(1, plan.data.max_len),
        scored=scored_positions(plan),
        b=size.dtype_bytes,
        eager=size.eager_attention,
        max_rows=max(1, max_rows or plan.max_batch_rows),
    )
    phases = _ESTIMATORS.get(job.op, _generic)(plan, job, shape)
    top = max(phases, key=lambda p: p.total)
    cpu = device.split(":")[0] == "cpu"
    return JobMemory(
        weights=size.weight_bytes,
        kept=top.kept,
        activations=top.act,
        logits=top.logits,
        gradients=top.grads,
        allocator=int(ALLOCATOR * top.total) if cpu else 0,
        rows=max(p.rows for p in phases),
        phase=top.name,
    )


def scored_positions(plan: Plan) -> int:
    """Positions per row the metric scores (a range's length; 'all': the longest row)."""
    return _role_positions(plan, max(1, plan.data.max_len), plan.metric.get("at", "last"))


# --- what each op keeps -----------------------------------------------------------------------


def _layer(plan: Plan, site: str) -> tuple[int, int]:
    """Where a site is in the forward order: (layer, 1 inside a block else 0); the embedding is
    layer -1, the unembedding n_layers."""
    if site in ("embed", "tokens"):
        return -1, 0
    if site == "logits":
        return plan.dims["n_layers"], 0
    binding = plan.sites.get(site)
    inside = int(binding is not None and bool(re.search(r"\.\d+\.\w", binding.module)))
    m = re.match(r"L(\d+)\.", site)
    found = re.findall(r"\.(\d+)(?:\.|$)", binding.module) if binding else []
    layer = int(m.group(1)) if m else int(found[0]) if found else plan.dims["n_layers"] - 1
    return layer, inside


def _prefix(plan: Plan, s: _Shape, site: str | None, rows: int) -> int:
    """Bytes of the clean outputs a pass resuming at ``site`` skips: the embeddings, the blocks
    below and, inside a block, the modules before the site (a norm and q/k/v)."""
    if site is None:
        return 0
    layer, inside = _layer(plan, site)
    return 0 if layer < 0 else (layer + 2 + 4 * inside) * s.u(rows)


def _width(plan: Plan, s: _Shape, site: str) -> int:
    """Columns a site's values have (d_model when the whole module)."""
    binding = plan.sites.get(site)
    width = binding.width if binding is not None else None
    return width or s.d


def _module_width(plan: Plan, s: _Shape, site: str) -> int:
    """The width of a site's whole module: d_model, or a multiple of it the columns reach
    (e.g. GPT-2's fused q/k/v)."""
    binding = plan.sites.get(site)
    stop = binding.stop if binding is not None and binding.stop else s.d
    return -(-max(stop, s.d) // s.d) * s.d


def _writes(plan: Plan, s: _Shape, rows: int, sites: set[str]) -> int:
    """The edited copies a pass writing ``sites`` makes: the widest two modules, whole."""
    widths = sorted({_module_width(plan, s, x) for x in sites}, reverse=True)[:2]
    return sum(s.u(rows, w) for w in widths)


def _role_positions(plan: Plan, seq: int, role: Any) -> int:
    """Positions a role names per row: a range's length (``all``: every one), else one."""
    if role is None:
        return seq
    spec = plan.positions.get(role, role) if isinstance(role, str) else role
    if isinstance(spec, dict) and "start" in spec:
        stop = seq if spec.get("stop") is None else spec["stop"]
        return max(1, min(seq, stop) - spec["start"])
    return 1


def _values(plan: Plan, s: _Shape, rows: int, keys: set[tuple[str, Any]]) -> int:
    """Source values read at (site, role): [rows, positions, width] each, fp32."""
    return sum(rows * _role_positions(plan, s.seq, p) * _width(plan, s, k) * 4 for k, p in keys)


@register_memory("patch")
def _patch(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """run_job: the source pass, the clean pass caching the prefix every group resumes from,
    then groups of variants packed as copies of the rows, each with the cache repeated."""
    b, n = len(job.rows), len(job.variants)
    per = max(1, s.max_rows // max(1, b))

    def first(v: Variant) -> str | None:
        return min((i.site for i in v.interventions), key=lambda x: _layer(plan, x), default=None)

    def where(v: Variant) -> tuple[int, int]:
        site = first(v)
        return (-2, 0) if site is None else _layer(plan, site)

    order = sorted(job.variants, key=where)  # as run_job packs them: by their first write
    groups = [order[i : i + per] for i in range(0, n, per)]
    starts = [first(g[0]) for g in groups]
    cache = max((_prefix(plan, s, f, b) for f in starts), default=0)
    keys = {(i.site, i.pos) for v in job.variants for i in v.interventions}
    values = _values(plan, s, 1 if job.source == "mean" else b, keys)
    phases = []
    if job.source == "mean":
        phases.append(_pass("mean", s, min(s.max_rows, len(job.source_rows)), 0, s.seq, False))
    src = 0
    if job.source in ("rows", "column"):
        phases.append(_pass("source", s, b))
        src = s.logits(b, s.scored, False)
    kept = values + src + cache
    phases.append(_pass("clean", s, b, kept))
    kept += s.logits(b, s.scored)
    for group, start in zip(groups, starts, strict=True):
        rows = len(group) * b
        sites = {i.site for v in group for i in v.interventions}
        repeat = len(group) * _prefix(plan, s, start, b)
        writes = _writes(plan, s, rows, sites)
        phases.append(_pass("patched", s, rows, kept + repeat, writes=writes))
    return phases


@register_memory("path_patch")
def _path_patch(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """path_op: the clean values of every freeze module (kept whole), then pass 2 (senders and
    freeze modules written) and pass 3 (receivers written) blocks of at most max rows. The
    copies pass 2 makes of the freeze modules outlive it (reference cycles of the trace, until
    Python's collector runs): about the frozen values again, measured."""
    b = len(job.rows)
    rows = min(b, s.max_rows)
    widths: dict[tuple[str, str], int] = {}
    for name in job.params.get("freeze", []):
        binding = plan.sites.get(name)
        key = (binding.module, binding.io) if binding else (name, "")
        widths[key] = min(s.d, widths.get(key, 0) + _width(plan, s, name))
    frozen = sum(s.u(b, w) for w in widths.values())
    senders = {(i.site, i.pos) for v in job.variants for i in v.interventions}
    receivers = {x for r in job.params.get("receivers", []) for x in r if x != "logits"}
    kept = frozen + 2 * s.logits(b, s.scored) + _values(plan, s, b, senders)
    pass2 = set(job.params.get("freeze", [])) | {x for x, _ in senders}
    return [
        _pass("source", s, rows),
        _pass("clean", s, rows, frozen),
        _pass("pass 2", s, s.max_rows, kept, writes=_writes(plan, s, s.max_rows, pass2)),
        _pass(
            "pass 3", s, s.max_rows, kept + frozen, writes=_writes(plan, s, s.max_rows, receivers)
        ),
    ]


@register_memory("attribution")
def _attribution(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """attribution_op: per chunk a source pass, a gradient pass from the first site (logits at
    the scored positions), one backward; then the top items patched for real (a patch job)."""
    rows = min(len(job.rows), s.max_rows)
    items = job.params.get("items", [])
    sites = {it[0] for it in items} | {it[2] for it in items if len(it) > 2}
    first = min((_layer(plan, x)[0] for x in sites), default=0)
    modules = {(plan.sites[x].module, plan.sites[x].io) if x in plan.sites else x for x in sites}
    grads = len(modules) * s.u(rows) + s.backward(rows, s.layers - max(0, first), s.scored)
    keys = {(it[0], it[1]) for it in items}
    kept = _values(plan, s, rows, keys) + s.logits(rows, s.scored, False)
    phases = [_pass("source", s, rows), _Phase("gradient", kept, 0, 0, grads, rows)]
    top = int(job.params.get("top_k", 0)) + int(job.params.get("bottom", 0))
    verify = job.model_copy(
        update={
            "op": "patch",
            "rows": job.rows[:rows],
            "variants": tuple(
                Variant(label=str(i), interventions=(Intervention(site=it[0], pos=it[1]),))
                for i, it in enumerate(items[:top])
            ),
        }
    )
    return phases + _patch(plan, verify, s)


@register_memory("das")
def _das(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """das_op: capture the site on every row (and the train bases' whole outputs for skip
    mode); check skip mode once (logits everywhere for one batch: the reference, the skipped
    run and ``allclose``'s temporaries); training steps with gradients above the site (logits
    at the metric position only); scoring passes."""
    p, cfg = job.params, job.params.get("training", {})
    n, layer = len(job.rows), _layer(plan, p["site"])[0]
    width = _width(plan, s, p["site"])
    values = n * _role_positions(plan, s.seq, p.get("position")) * width * 4
    train = len(p["train"]["base"])
    epochs = int(cfg.get("epochs", 1))
    full = len(set(p["train"]["base"])) * s.u(1)
    full = full if epochs and full <= DAS_CACHE else 0
    kept = values + full + 8 * width * width * 4  # the rotation, its gradient, Adam's moments
    bs = max(1, min(int(cfg.get("batch_size", 64)), train))
    phases = [_pass("capture", s, min(n, s.max_rows), values + full)]
    if epochs:
        check = _pass("skip check", s, bs, kept, s.seq, False)
        phases += [
            replace(check, logits=6 * check.logits),
            _Phase("train", kept, 0, 0, s.backward(bs, s.layers - 1 - layer, 1), bs),
        ]
    return phases + [_pass("score", s, min(s.max_rows, max(1, train)), kept, 1, False)]


@register_memory("logit_lens")
def _logit_lens(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """logit_lens_op: clean passes reading every lens point at the scored positions, then packed
    lens passes writing the final residual stream."""
    b, rows = len(job.rows), min(len(job.rows), s.max_rows)
    points = len(job.params.get("layers", [])) + 1
    kept = points * b * s.scored * s.d * s.b + s.logits(b, s.scored)
    lens = _pass("lens", s, s.max_rows, kept, writes=s.u(s.max_rows))
    return [_pass("clean", s, rows, kept), lens]


@register_memory("causal_tracing")
def _causal_tracing(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """tracing_op: the embeddings' std (every token, fp64; logits everywhere), a clean pass
    reading every restored site whole, then packed corrupted and restored passes."""
    p = job.params
    b, rows = len(job.rows), min(len(job.rows), s.max_rows)
    scale_rows = len(p.get("scale_rows", job.rows))
    scale = _pass("scale", s, min(scale_rows, s.max_rows), scale_rows * s.seq * s.d * 8, s.seq)
    restored = {x for cell in p.get("cells", []) for x in cell[3]}
    kept = sum(s.u(b, _width(plan, s, x)) for x in restored) + s.logits(b, s.scored)
    writes = _writes(plan, s, s.max_rows, restored | {"embed"})
    return [
        replace(scale, logits=s.logits(scale.rows, s.seq, False)),
        _pass("clean", s, rows, kept),
        _pass("restore", s, s.max_rows, kept, writes=writes),
    ]


@register_memory("discovery")
def _discovery(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """discovery_op: every sender's source write and the linear readers' weight blocks; per
    chunk a gradient pass (logits everywhere) with a gradient per receiver and a change per
    sender (about three such [rows, T, d] tensors per sender and receiver are still held when the
    circuits run); packed ablated passes, every sender's change kept for each circuit's rows."""
    p = job.params
    b = len(job.rows)
    rows = min(b, s.max_rows)
    senders, receivers = len(p.get("senders", [])), len(p.get("receivers", []))
    kept = (1 if job.source == "mean" else b) * (senders + 1) * s.u(1)
    kept += s.layers * 4 * s.d * s.d * s.b  # q/k/v and MLP input weight blocks
    steps = int(p.get("steps", 1)) if p.get("method") == "eap_ig" else 1
    alphas = max(1, min(steps, s.max_rows // rows))
    grads = s.backward(alphas * rows, s.layers) + 4 * (senders + receivers) * s.u(rows)
    circuits = max(len(p.get("sizes", [])), int(p.get("minimality", 0)), 1)
    packed = min(circuits, max(1, s.max_rows // b)) * b if b <= s.max_rows else rows
    held = kept + 3 * (senders + receivers) * s.u(rows)
    return [
        _pass("source", s, min(len(job.source_rows) or b, s.max_rows), kept, 0),
        _Phase("scores", kept, 0, 0, grads, alphas * rows),
        _pass("circuits", s, packed, held + senders * s.u(packed), s.seq),
    ]


@register_memory("scrub")
def _scrub(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """scrub_op: per site a table of the values read (every stage row's value at about half the
    positions, at the sites' mean width), then stages of at most max rows, each gathering its
    writes and reads (capped at ``params["pass_floats"]``); logits at the scored positions
    (``full_passes``: everywhere)."""
    p = job.params
    stages = p.get("level_rows") or [len(job.rows)]
    rows = min(max(stages), s.max_rows)
    widths = [w for w in p.get("widths", []) if w < s.vocab] or [s.d]
    tables = sum(stages) * -(-s.seq // 2) * (sum(widths) // len(widths)) * s.b
    gathered = min(int(p.get("pass_floats", 1 << 28)) * s.b, 2 * s.u(rows))
    logits = s.seq if p.get("full_passes") else None
    return [_pass("levels", s, rows, tables + gathered, logits)]


def _generic(plan: Plan, job: Job, s: _Shape) -> list[_Phase]:
    """An op with no estimator of its own: one pass of its rows, logits everywhere."""
    rows = min(max(1, len(job.rows)), s.max_rows)
    return [_pass("pass", s, rows, 0, s.seq)]


# --- fitting a runner's memory ----------------------------------------------------------------


@dataclass(frozen=True)
class MemoryLimit:
    """Memory per worker, and where the figure comes from (for messages)."""

    bytes: int
    source: str


@dataclass(frozen=True)
class Fit:
    """Rows per pass that fit, and each experiment's largest job estimate at those rows."""

    rows: int
    planned: int  # the plan's max_batch_rows
    peaks: dict[str, JobMemory]
    limit: MemoryLimit | None

    @property
    def lowered(self) -> bool:
        return self.rows < self.planned

    def describe(self) -> str:
        if self.limit is None:
            return "memory: no limit known for this runner; rows per pass as planned"
        head = f"memory: {_size(self.limit.bytes)} per worker ({self.limit.source})"
        if self.lowered:
            return f"{head}; rows per pass lowered {self.planned} -> {self.rows} to fit"
        return f"{head}; every job fits at {self.rows} rows per pass"


# Dask pauses a worker whose memory passes 80 % of its limit (on a GPU: room for the caching
# allocator's blocks); the worker process itself (Python, torch, transformers, nnsight, Dask; on
# a GPU the CUDA context) takes about PROCESS bytes besides
HEADROOM, PROCESS = 0.8, 512 * 2**20


def budget_of(limit: MemoryLimit) -> int:
    """What a job's estimate (weights included) may use of ``limit``: below Dask's pause
    threshold, less the worker process itself."""
    return max(0, int(limit.bytes * HEADROOM) - PROCESS)


def experiment_peaks(
    plan: Plan, size: ModelSize | None = None, max_rows: int | None = None, device: str = "cpu"
) -> dict[str, JobMemory]:
    """Per experiment, the estimate of its largest job."""
    out: dict[str, JobMemory] = {}
    for job in plan.jobs:
        est = estimate_job(plan, job, size, max_rows, device)
        if job.experiment not in out or est.total > out[job.experiment].total:
            out[job.experiment] = est
    return out


def fit_rows(
    plan: Plan, limit: MemoryLimit | None, size: ModelSize | None = None, device: str = "cpu"
) -> Fit:
    """The most rows per pass (at most the plan's) at which every job's estimate fits
    ``limit``; a `MemoryLimitError` naming the experiment, its estimate and the limit when one
    does not fit even at one row a pass."""
    planned = plan.max_batch_rows
    peaks = experiment_peaks(plan, size, planned, device)
    if limit is None:
        return Fit(planned, planned, peaks, None)
    budget = budget_of(limit)

    def fits(rows: int) -> bool:
        return all(e.total <= budget for e in experiment_peaks(plan, size, rows, device).values())

    if fits(planned):
        return Fit(planned, planned, peaks, limit)
    if not fits(1):
        smallest = experiment_peaks(plan, size, 1, device)
        name, est = max(smallest.items(), key=lambda kv: kv[1].total)
        kind = next((e.kind for e in plan.experiments if e.name == name), "?")
        weights = f"; the weights alone take {_size(est.weights)}" if est.weights > budget else ""
        raise MemoryLimitError(
            f"experiment {name!r} ({kind}) cannot fit the runner's memory: "
            f"{_size(limit.bytes)} per worker ({limit.source}) leaves {_size(budget)} for a "
            f"job, and its largest job needs ~{_size(est.total)} even at its smallest passes "
            f"[{est.describe()}]{weights}; lower the experiment's batch_size, use a smaller "
            "model.dtype, or give workers more memory"
        )
    lo, hi = 1, planned  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return Fit(lo, planned, experiment_peaks(plan, size, lo, device), limit)
