"""The ``das`` job op: learn an orthogonal rotation at one site by interchange interventions.

For base ``b`` and a source ``s_v`` per swapped variable ``v``, the site value becomes
``h_b + sum_v R_v (m_v * R_v^T (h_{s_v} - h_b))``: the columns ``R_v`` of one shared rotation
(``full`` / ``boundless``: d x d; ``low_rank``: d x K orthonormal columns) are variable ``v``'s
subspace; ``m_v`` is 1, or a learned boundary mask (``boundless``). The rotation is fp32 whatever
the model's dtype and is parametrized once per step (one ``R`` per step, used for every variable).

Cost model: the model is frozen, so the site's value on every row (bases and sources) is captured
once. When all rows have one length, a training step skips the modules below the site (their
outputs are zero placeholders, checked once to leave the logits unchanged) and the site module
(its cached base output, patched): it pays only for the layers above the site, forward and
backward. Gradients go to the rotation (and boundaries) only, through ``autograd.grad``.

Reproducibility: the initial rotation (and a ``low_rank`` rotation's completion to d x d), the
batch order and the random-rotation control come from the job's ``seed`` alone, never from the
global RNG state; on CUDA, deterministic kernels are asked for while it trains. So a job trained
twice on one machine gives the same rotation and IIA bit for bit (threads: as many as you like,
for the small models the tests use; a large model's matmuls can split a sum by thread count). On
another CPU, float rounding differs (other SIMD kernels), so a trained rotation, and the few
pairs near a decision threshold, can differ: assert what DAS guarantees (IIA near 1 on a known
mechanism), never a trained value exactly.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from tqdm.auto import tqdm

from mi_spec.data.dataset import Dataset
from mi_spec.data.positions import resolve_role
from mi_spec.errors import ExecutionError
from mi_spec.execute.engine import Engine, Read, assign, replace
from mi_spec.execute.ops import register_op
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection

CACHE_BYTES = 1 << 30  # cached base site outputs above this: run the whole model each step
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


_RNG = threading.Lock()  # one seeded use of torch's global CPU generator at a time (threads)
_DETERMINISTIC = threading.Lock()
_deterministic_users: list[tuple[bool, bool, bool, bool]] = []


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's global CPU generator seeded with ``seed``, its state restored after (CUDA's
    untouched: the rotation lives on the CPU)."""
    with _RNG:
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_rng_state(state)


@contextmanager
def _deterministic(device: Any) -> Iterator[None]:
    """On CUDA, deterministic kernels while DAS trains and scores (cuDNN, and torch's own where it
    has one: ``warn_only``, so an op without one still runs); the flags are process-wide, so they
    are restored when the last DAS job in this process leaves. CPU kernels already are
    deterministic for a given machine and thread count."""
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    with _DETERMINISTIC:
        if not _deterministic_users:
            saved = (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                cudnn.deterministic,
                cudnn.benchmark,
            )
            if not saved[0]:  # an existing strict setting stays strict
                torch.use_deterministic_algorithms(True, warn_only=True)
            cudnn.deterministic, cudnn.benchmark = True, False
        else:
            saved = _deterministic_users[0]
        _deterministic_users.append(saved)
    try:
        yield
    finally:
        with _DETERMINISTIC:
            _deterministic_users.pop()
            if not _deterministic_users:
                enabled, warn_only, cudnn.deterministic, cudnn.benchmark = saved
                torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class Interchange(nn.Module):
    """A shared fp32 rotation; variable ``v`` owns columns ``[v*k, (v+1)*k)``.

    Reproducible from ``seed`` alone, whatever the global RNG state: the initial rotation and the
    draw ``parametrizations.orthogonal`` makes to complete a ``low_rank`` d x K matrix to d x d
    (at construction, and again on :meth:`set_matrix`) come from torch's CPU generator seeded with
    ``seed``, its state restored after (:func:`_seeded`)."""

    def __init__(self, width: int, n_vars: int, k: int, kind: str, seed: int = 0):
        super().__init__()
        if k < 1 or n_vars * k > width:
            raise ExecutionError(f"das: {n_vars} variable(s) x dim {k} exceed width {width}")
        self.k, self.n_vars, self.kind, self.seed = k, n_vars, kind, seed
        cols = n_vars * k if kind == "low_rank" else width
        self.shape = (width, cols)
        with _seeded(seed):
            linear = nn.Linear(cols, width, bias=False, dtype=torch.float32)  # weight [w, cols]
            nn.init.orthogonal_(linear.weight)
            self.rotation = parametrizations.orthogonal(linear)
        self.boundary = nn.Parameter(torch.full((n_vars,), 0.5), requires_grad=kind == "boundless")

    def matrix(self) -> torch.Tensor:
        """R [width, cols] with orthonormal columns: one parametrization call."""
        return self.rotation.weight

    @torch.no_grad()
    def set_matrix(self, r: torch.Tensor) -> None:
        with _seeded(self.seed):
            self.rotation.weight = r.float()

    def masks(self, temperature: float | None) -> torch.Tensor:
        """[n_vars, k] weights of each variable's rotated dims: soft (training) or hard (None)."""
        if self.kind != "boundless":
            return torch.ones(self.n_vars, self.k)
        idx = torch.arange(self.k, dtype=torch.float32)
        edge = self.boundary[:, None] * self.k
        if temperature is None:
            return (idx < edge.detach().round().clamp(min=1)).float()
        return torch.sigmoid((edge - idx - 0.5) / temperature)

    def apply(self, r, m, hb: torch.Tensor, hs: list[torch.Tensor], on) -> torch.Tensor:
        """Interchanged values [B, P, w] (fp32): base [B, P, w], a source per variable, on [V, B]."""
        out = hb
        for v, src in enumerate(hs):
            rv = r[:, v * self.k : (v + 1) * self.k]
            out = out + (((src - hb) @ rv) * m[v] * on[v][:, None, None]) @ rv.T
        return out

    @torch.no_grad()
    def check(self) -> dict[str, Any]:
        """The invariants: max |R^T R - I| and R's dtype (fp32 whatever the model's)."""
        r = self.matrix()
        error = (r.T @ r - torch.eye(r.shape[1])).abs().max().item()
        return {"orthogonality_error": error, "rotation_dtype": str(r.dtype).split(".")[-1]}


def rotation_bytes(inter: Interchange, meta: dict[str, Any]) -> bytes:
    """A saved rotation (``torch.load`` / :func:`load_rotation` it, or reuse: ``init: <file>``)."""
    with torch.no_grad():
        state = {"rotation": inter.matrix().cpu(), "boundary": inter.boundary.detach().cpu()}
    buf = io.BytesIO()
    torch.save({**state, "k": inter.k, "kind": inter.kind, **meta}, buf)
    return buf.getvalue()


def load_rotation(source: str | Path | bytes) -> dict[str, Any]:
    """A rotation saved by a DAS run: rotation [w, cols], boundary, k, kind, site, variables."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


@dataclass
class Split:
    """Pairs as indices into the captured rows: base [N], src [V, N] (base if unswapped), on."""

    base: torch.Tensor
    src: torch.Tensor
    on: torch.Tensor
    labels: torch.Tensor
    rows: list[int]  # dataset rows of the bases

    @classmethod
    def of(cls, pairs: dict[str, Any], index: dict[int, int]) -> Split:
        base = [index[r] for r in pairs["base"]]
        src = [[index[s] if s >= 0 else b for s, b in zip(c, base)] for c in pairs["sources"]]  # noqa: B905
        on = [[float(s >= 0) for s in c] for c in pairs["sources"]]
        tensors = (torch.tensor(x) for x in (base, src, on, pairs["labels"]))
        return cls(*tensors, list(pairs["base"]))

    def __len__(self) -> int:
        return len(self.base)


@dataclass
class Captured:
    values: torch.Tensor  # [rows, P, w] fp32 site values at the role positions
    pos: torch.Tensor  # [rows, P] the role's positions in each row
    at: torch.Tensor  # [rows] metric position
    clean: torch.Tensor  # [rows] clean prediction at the metric position
    full: torch.Tensor | None = None  # [train bases, T, D] base site outputs (skip mode)
    full_of: dict[int, int] | None = None  # dataset row -> index into ``full``


def _capture(job: Job, plan: Plan, engine: Engine, data: Dataset, site, role, keep) -> Captured:
    """One no-grad pass over every row the job uses (``keep``: rows whose full output to cache)."""
    table, metric = plan.position_table(), MetricSection.model_validate(plan.metric)
    whole = SiteBinding(name="__whole__", module=site.module, io=site.io)
    parts: dict[str, list] = {k: [] for k in ("values", "pos", "at", "clean", "full")}
    rows, full_of = list(job.rows), {}
    for i in range(0, len(rows), plan.max_batch_rows):
        chunk = rows[i : i + plan.max_batch_rows]
        ids, mask = (torch.tensor(x, device=engine.device) for x in data.padded(chunk))
        pos = None if role is None else torch.tensor(resolve_role(role, table, data, chunk))
        at = torch.tensor(resolve_role(metric.at, table, data, chunk))
        if at.shape[1] != 1:
            raise ExecutionError(f"das: metric position {metric.at!r} must be one position per row")
        reads = [Read("v", site, pos)] + [Read("f", whole, None)] * bool(keep)
        logits, got = engine.run(ids, mask, reads, logits=at)
        if keep and got["f"][0].numel() * got["f"].element_size() * len(keep) > CACHE_BYTES:
            keep = set()  # too large to cache: train with whole forward passes
        picked = [j for j, r in enumerate(chunk) if r in keep]
        full_of |= {chunk[j]: len(full_of) + n for n, j in enumerate(picked)}
        parts["full"] += [got["f"][picked]] if picked else []
        parts["values"].append(got["v"].float().cpu())
        parts["pos"].append(
            torch.arange(ids.shape[1]).expand(len(chunk), -1) if pos is None else pos
        )
        parts["at"].append(at[:, 0])
        parts["clean"].append(logits[:, 0].argmax(-1).cpu())
    full = torch.cat(fulls) if (fulls := parts.pop("full")) and keep else None
    return Captured(**{k: torch.cat(v) for k, v in parts.items()}, full=full, full_of=full_of)


def _placeholder(value: Any) -> Any:
    """Zeros shaped like ``value`` (an expanded scalar: no memory); None if not a tensor tree."""
    if torch.is_tensor(value):
        return torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
    if isinstance(value, tuple | list):
        parts = [_placeholder(v) for v in value]
        if all(p is not None or v is None for p, v in zip(parts, value, strict=True)):
            return type(value)(parts)
    return None


class Runner:
    """Forwards with the site's value replaced: the whole model, or only above the site."""

    def __init__(self, engine: Engine, site: SiteBinding, data: Dataset):
        self.engine, self.site, self.data = engine, site, data
        self.prefix: list[tuple[str, Any]] = []  # skipped modules and their placeholders

    def forward(
        self,
        rows: list[int],
        pos,
        values,
        base_full: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
    ):
        """Logits [B, T, V], or with ``scored`` [B] only at each row's position there [B, V] (the
        unembedding runs there alone); with ``base_full`` (skip mode) nothing at or below the
        site runs."""
        e, s = self.engine, self.site
        ids, mask = (torch.tensor(x, device=e.device) for x in self.data.padded(rows))
        feed = scored is not None and e.unembed is not None and e.unembed != s.module
        with e.nn.trace(ids, **({"attention_mask": mask} if e.pass_mask else {})):
            for path, ph in self.prefix if base_full is not None else ():
                e.envoy(path).skip(ph)
            env = e.envoy(s.module)
            skip = base_full is not None and s.io == "output"
            if base_full is None:
                base_full = env.input if s.io == "input" else env.output
            new = base_full.clone()
            at = (torch.arange(new.shape[0], device=new.device)[:, None], pos.to(new.device))
            idx = (*at, slice(s.start, s.stop))
            new[idx] = assign(new[idx], s, values)
            if skip:
                env.skip(new)
            else:
                live = env.input if s.io == "input" else env.output
                replace(env, s.io, live, new, s.in_place)
            if feed:
                e.feed_unembed(len(rows), scored[:, None])
            out = e.nn.output.save()
        logits = out.logits if hasattr(out, "logits") else out
        if scored is None:
            return logits
        if feed:
            return logits[:, 0]
        return logits[torch.arange(len(rows)), scored.to(logits.device)]

    @torch.no_grad()
    def try_skip(self, rows: list[int], pos, values, base_full: torch.Tensor) -> bool:
        """Enter skip mode if placeholders below the site keep the clean logits of ``rows``."""
        e, outs = self.engine, {}
        ids, mask = (torch.tensor(x, device=e.device) for x in self.data.padded(rows))
        with e.nn.trace(ids, **({"attention_mask": mask} if e.pass_mask else {})):
            for path in e.prefix_modules(self.site.module):
                outs[path] = e.envoy(path).output
            outs[""] = e.nn.output
        ref = outs.pop("")
        ref = ref.logits if hasattr(ref, "logits") else ref
        self.prefix = [(p, ph) for p, o in outs.items() if (ph := _placeholder(o)) is not None]
        try:
            ok = torch.allclose(self.forward(rows, pos, values, base_full), ref, 1e-4, 1e-5)
        except Exception:  # a placeholder the model's own code cannot take: run it instead
            ok = False
        self.prefix = self.prefix if ok else []
        return bool(ok)


def _lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        f = (step - warmup) / max(1, total - warmup)
        curve = {"constant": 1.0, "linear": 1 - f, "cosine": (1 + math.cos(math.pi * f)) / 2}
        return (step + 1) / warmup if step < warmup else curve[schedule]

    return factor


class Trainer:
    """Trains and scores one Interchange on captured site values."""

    def __init__(self, inter: Interchange, runner: Runner, cap: Captured, batch_rows: int):
        self.inter, self.runner, self.cap, self.batch_rows = inter, runner, cap, batch_rows

    def logits_at(self, split: Split, idx: torch.Tensor, r, m, full=None) -> torch.Tensor:
        """Logits at the metric position of pairs ``idx`` (``full``: skip mode's base outputs)."""
        cap, b = self.cap, split.base[idx]
        hs = [cap.values[split.src[v, idx]] for v in range(self.inter.n_vars)]
        values = self.inter.apply(r, m, cap.values[b], hs, split.on[:, idx])
        rows = [split.rows[i] for i in idx.tolist()]
        return self.runner.forward(rows, cap.pos[b], values, full, cap.at[b]).float()

    @torch.no_grad()
    def correct(self, split: Split, r: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pair IIA (0/1) with hard masks; ``r`` defaults to the learned rotation."""
        r = self.inter.matrix() if r is None else r
        m, out = self.inter.masks(None), []
        for i in range(0, len(split), self.batch_rows):
            idx = torch.arange(i, min(i + self.batch_rows, len(split)))
            out.append(self.logits_at(split, idx, r, m).argmax(-1).cpu() == split.labels[idx])
        return torch.cat(out).float()

    def _skip_mode(self, train: Split, bs: int) -> torch.Tensor | None:
        """Per train pair, the index of its base's cached output if skip mode works, else None."""
        cap = self.cap
        if cap.full is None or not cap.full_of:
            return None
        fidx = torch.tensor([cap.full_of[r] for r in train.rows])
        b = train.base[:bs]
        ok = self.runner.try_skip(train.rows[:bs], cap.pos[b], cap.values[b], cap.full[fidx[:bs]])
        return fidx if ok else None

    def fit(self, train: Split, val: Split, cfg: dict[str, Any], seed: int, label: str) -> dict:
        inter = self.inter
        params = [p for p in inter.parameters() if p.requires_grad]
        bs = min(cfg["batch_size"], len(train))
        per_epoch, epochs = len(train) // bs, cfg["epochs"]
        total = max(1, per_epoch * epochs)
        extra = {"momentum": 0.9} if cfg["optimizer"] == "sgd" else {}
        # No weight decay on the rotation (AdamW's default 0.01 would shrink the +-1 diagonal the
        # low_rank Householder map truncates to int: columns became 0, R^T R != I)
        rot = {id(p) for p in inter.rotation.parameters()}
        groups = [{"params": [p for p in params if id(p) in rot], "weight_decay": 0.0}]
        groups += [{"params": rest}] if (rest := [p for p in params if id(p) not in rot]) else []
        opt = OPTIMIZERS[cfg["optimizer"]](groups, lr=cfg["lr"], **extra)
        factor = _lr_factor(cfg["schedule"], int(cfg["warmup"] * total), total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        fidx = self._skip_mode(train, bs) if epochs else None
        hist: dict[str, Any] = {
            "loss": [],
            "val_iia": [],
            "mode": "run" if fidx is None else "skip",
        }
        gen, (t0, t1) = torch.Generator().manual_seed(seed), cfg["temperature"]
        best, best_state, bad, step, t_start = -1.0, None, 0, 0, time.perf_counter()
        bar = tqdm(range(epochs), desc=f"das {label}", leave=False, disable=None)
        for _ in bar:
            order = torch.randperm(len(train), generator=gen)
            for i in range(per_epoch):
                idx = order[i * bs : (i + 1) * bs]
                r = inter.matrix()  # the rotation, once per step
                m = inter.masks(t0 * (t1 / t0) ** (step / max(1, total - 1)))
                full = None if fidx is None else self.cap.full[fidx[idx]]
                logits = self.logits_at(train, idx, r, m, full)
                loss = F.cross_entropy(logits, train.labels[idx].to(logits.device))
                if inter.kind == "boundless":
                    loss = loss + cfg["mask_penalty"] * inter.boundary.sum()
                for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                    p.grad = g
                opt.step()
                sched.step()
                with torch.no_grad():
                    inter.boundary.clamp_(1 / inter.k, 1.0)
                hist["loss"].append(loss.item())
                step += 1
            if not len(val):
                continue
            score = self.correct(val).mean().item()
            hist["val_iia"].append(score)
            bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}", val_iia=f"{score:.3f}")
            if score > best + cfg["min_delta"]:
                best, bad = score, 0
                best_state = {k: v.detach().clone() for k, v in inter.state_dict().items()}
            elif cfg["patience"] is not None and (bad := bad + 1) >= cfg["patience"]:
                break
        bar.close()
        if best_state is not None:
            inter.load_state_dict(best_state)
        seconds = (time.perf_counter() - t_start) / max(1, step)
        return hist | {"best_val_iia": best if best >= 0 else None, "steps": step,
                       "seconds_per_step": seconds}  # fmt: skip


def _init(inter: Interchange, init: str, plan: Plan) -> None:
    """Start from ``random`` (as built), ``identity``, or a saved rotation file."""
    if init == "identity":
        inter.set_matrix(torch.eye(*inter.shape))
    elif init != "random":
        path = Path(init) if Path(init).is_absolute() else Path(plan.model.base_dir) / init
        if not path.exists():
            raise ExecutionError(f"das: init rotation file not found: {path}")
        saved = load_rotation(path)
        if tuple(saved["rotation"].shape) != inter.shape or saved["k"] != inter.k:
            shapes = f"{tuple(saved['rotation'].shape)} != {inter.shape}"
            raise ExecutionError(f"das: {path} does not fit this experiment's rotation: {shapes}")
        inter.set_matrix(saved["rotation"])
        inter.boundary.data.copy_(saved["boundary"])


@register_op("das", version=2)  # 2: seeded low-rank completion, no weight decay on the rotation
def run_das(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Train on ``params.train``, stop early on ``params.val``, score ``params.test`` with the
    learned rotation, a random rotation and no intervention (the base-label floor)."""
    t_start, p = time.perf_counter(), job.params
    site, n_vars, cfg = plan.sites[p["site"]], len(p["variables"]), p["training"]
    engine.check_binding(site)
    same_length = len(set(map(data.lengths.__getitem__, job.rows))) == 1
    keep = set(p["train"]["base"]) if same_length and cfg["epochs"] else set()
    cap = _capture(job, plan, engine, data, site, p["position"], keep)
    width = cap.values.shape[-1]
    k = width // n_vars if p["intervention"] == "boundless" else p["dim"]
    k = k or (1 if p["intervention"] == "low_rank" else width // n_vars)
    inter = Interchange(width, n_vars, k, p["intervention"], seed=p["seed"])
    _init(inter, p["init"], plan)
    index = {r: i for i, r in enumerate(job.rows)}
    train, val, test = (Split.of(p[s], index) for s in ("train", "val", "test"))
    trainer = Trainer(inter, Runner(engine, site, data), cap, plan.max_batch_rows)
    gen = torch.Generator().manual_seed(p["seed"] + 104_729)
    random_rotation = torch.linalg.qr(torch.randn(*inter.shape, generator=gen))[0]
    with _deterministic(engine.device):
        hist = trainer.fit(train, val, cfg, p["seed"], p["label"])
        scores = [trainer.correct(test), trainer.correct(test, random_rotation)]
    floor = (cap.clean[test.base] == test.labels).float()
    task = (cap.clean[test.base] == torch.tensor(p["test"]["base_labels"])).float().mean().item()
    blob = rotation_bytes(inter, {k: p[k] for k in ("site", "position", "variables", "label")})
    extra = hist | {
        "label": p["label"], "base_accuracy": task, "dim": k,
        **inter.check(), "boundless_dims": inter.masks(None).sum(-1).tolist(),
        "rotation": base64.b64encode(blob).decode(),
        "rotation_sha256": hashlib.sha256(blob).hexdigest()[:16],
    }  # fmt: skip
    variants = tuple(tuple(s.tolist()) for s in scores)
    seconds = time.perf_counter() - t_start
    return JobResult(job_id=job.id, clean=tuple(floor.tolist()), variants=variants, extra=extra,
                     seconds=seconds)  # fmt: skip
