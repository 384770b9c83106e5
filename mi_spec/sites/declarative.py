"""Declarative adapters: a YAML mapping from the site vocabulary to a custom model's module paths.

A custom PyTorch model is supported without writing Python: ``model.adapter`` in a hypothesis names a
``.yaml`` file (relative to the hypothesis) or holds the same mapping inline::

    name: tiny-lm                  # optional; default: the file's stem
    matches: [TinyLM]              # optional: the model classes it describes (checked at load)
    dims:                          # a number, or an attribute path on the model
      n_layers: config.n_layers
      n_heads: config.n_heads
      n_kv_heads: config.n_kv_heads   # optional; fewer than n_heads = grouped-query attention
      d_head: config.d_head
      d_model: config.d_model
      d_vocab: config.vocab
    sites:                         # site kind -> module path (its output) or {module, io, ...}
      embed: tok_embed
      resid_pre: {module: "blocks.{layer}", io: input}
      resid_post: "blocks.{layer}"
      head: {module: "blocks.{layer}.attn.out", io: input}    # z, heads side by side
      q: {module: "blocks.{layer}.attn.qkv", block: 0}        # fused [q | k | v] projection
      k: {module: "blocks.{layer}.attn.qkv", block: 1}
      logits: unembed

Site kinds: ``embed``, ``logits``, the layer kinds (``resid_pre``, ``resid_mid``, ``resid_post``,
``attn_out``, ``mlp_in``, ``mlp_out``) and the head kinds (``head`` = z, ``q``, ``k``, ``v``). Head
sites split the activation's last dimension into ``d_head`` columns per head; in a fused
projection ``block`` picks q (0), k (1) or v (2), and ``layout: heads`` says the columns go head by
head (``[q0 k0 v0 | q1 k1 v1 | ...]``, GPT-NeoX) instead of ``[all q | all k | all v]``.

The adapter is rebuilt from the model section wherever the model is loaded (also on Dask workers),
so nothing is registered globally. Every problem in the file is reported at once, with its
file:line:col and field.
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from mi_spec.errors import MiSpecError, ResolveError
from mi_spec.sites.adapter import Adapter, Dims, Hook, adapter_for, head_start
from mi_spec.sites.vocabulary import GLOBAL_KINDS, HEAD_PARTS, LAYER_KINDS
from mi_spec.spec.load import LoadedDoc, load_yaml
from mi_spec.spec.locate import issue_at, issues_from_validation_error
from mi_spec.spec.sections import Section

HEAD_KINDS = ("head", *HEAD_PARTS)
SITE_KINDS = (*GLOBAL_KINDS, *LAYER_KINDS, *HEAD_KINDS)

Dim = Annotated[
    int | str,
    Field(union_mode="left_to_right", description="A number, or an attribute path on the model"),
]


class SiteHook(Section):
    """Where one site kind lives in the model."""

    module: str = Field(description="Module path; `{layer}` stands for the layer index")
    io: Literal["input", "output"] = Field("output", description="The module's input or output")
    block: int = Field(
        0, ge=0, le=2, description="q/k/v sites in a fused projection: 0 = q, 1 = k, 2 = v"
    )
    layout: Literal["blocks", "heads"] = Field(
        "blocks",
        description="Fused columns: 'blocks' = [all q | all k | all v], 'heads' = head by head",
    )
    shared: bool = Field(
        False,
        description="The module's input tensor is also used outside it (a residual skip, as for "
        "resid_mid at a norm's input): patch it in place so every use sees the new value",
    )


class DimsSpec(Section):
    n_layers: Dim
    n_heads: Dim
    d_head: Dim
    d_model: Dim
    d_vocab: Dim
    n_kv_heads: Dim | None = None


class AdapterSpec(Section):
    """A declarative adapter file."""

    name: str | None = Field(None, description="The adapter's name (default: the file's stem)")
    matches: list[str] = Field(
        default_factory=list, description="Model class names it describes (default: any)"
    )
    dims: DimsSpec
    sites: dict[str, str | SiteHook] = Field(description="Site kind -> module path or hook")


def pick_adapter(model: Any, value: str | dict[str, Any] | None, base_dir: Path) -> Adapter:
    """The adapter ``model.adapter`` asks for: a declarative one (a ``.yaml`` file or a mapping),
    a built-in one by name, or (None) the built-in that matches the model's class."""
    if isinstance(value, dict) or (isinstance(value, str) and value.endswith((".yaml", ".yml"))):
        return load_declarative(value, base_dir, model)
    return adapter_for(model, value)


@dataclass
class _Source:
    """Where the adapter was written: a file (located issues) or inline in ``model.adapter``."""

    label: str
    doc: LoadedDoc | None
    problems: list[str]

    def add(self, path: tuple[str | int, ...], message: str, at_key: bool = False) -> None:
        if self.doc is None:
            self.problems.append(f"{'.'.join(map(str, ('adapter', *path)))}: {message}")
        else:
            self.problems.append(str(issue_at(self.doc, path, message, at_key=at_key)))

    def error(self) -> ResolveError:
        n = len(self.problems)
        return ResolveError(
            f"declarative adapter {self.label}: {n} problem{'s' if n != 1 else ''}:\n  "
            + "\n  ".join(self.problems),
            ("adapter",),
        )

    def check(self) -> None:
        if self.problems:
            raise self.error()


def load_declarative(value: str | dict[str, Any], base_dir: Path, model: Any) -> Adapter:
    """Parse a declarative adapter (file path or mapping) and check it against ``model``."""
    source, spec = _parse(value, base_dir)
    dims = _read_dims(spec, model, source)
    if dims is None:
        raise source.error()
    if spec.matches and type(model).__name__ not in spec.matches:
        source.add(
            ("matches",),
            f"describes {', '.join(spec.matches)}, but the model is a {type(model).__name__}",
        )
    table = {}
    modules = dict(model.named_modules())
    for kind, entry in spec.sites.items():
        if kind not in SITE_KINDS:
            continue  # reported by _parse
        hook = _check_site(kind, entry, dims, modules, source)
        if hook is not None:
            table[kind] = hook
    source.check()
    name = spec.name or (Path(value).stem if isinstance(value, str) else "declarative")
    return Adapter(
        name=name,
        matches=lambda m: not spec.matches or type(m).__name__ in spec.matches,
        dims=lambda m: _dims_or_raise(spec, m, source.label),
        table=table,
    )


def _parse(value: str | dict[str, Any], base_dir: Path) -> tuple[_Source, AdapterSpec]:
    if isinstance(value, dict):
        source, data = _Source("model.adapter (inline)", None, []), value
    else:
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise ResolveError(f"declarative adapter file not found: {path}", ("adapter",))
        try:
            doc = load_yaml(path)
        except MiSpecError as e:
            raise ResolveError(f"declarative adapter {path}: {e}", ("adapter",)) from None
        source, data = _Source(str(path), doc, []), doc.data
    sites = data.get("sites") if isinstance(data, dict) else None
    for kind in sites if isinstance(sites, dict) else ():
        if kind not in SITE_KINDS:
            near = difflib.get_close_matches(str(kind), SITE_KINDS, n=1)
            source.add(
                ("sites", kind),
                f"unknown site kind {kind!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; expected one of {', '.join(SITE_KINDS)}",
                at_key=True,
            )
    try:
        spec = AdapterSpec.model_validate(data)
    except ValidationError as e:
        if source.doc is None:
            for err in e.errors(include_url=False):
                missing = err["type"] == "missing"
                source.add(
                    tuple(err["loc"]), "required field is missing" if missing else err["msg"]
                )
        else:
            source.problems += [
                str(i) for i in issues_from_validation_error(e, source.doc, AdapterSpec)
            ]
        raise source.error() from None
    return source, spec


def _attr(model: Any, path: str) -> Any:
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            have = sorted(k for k in getattr(obj, "__dict__", {}) if not k.startswith("_"))
            raise AttributeError(
                f"{type(obj).__name__} has no attribute {part!r}"
                + (f" (it has: {', '.join(have[:12])})" if have else "")
            )
        obj = getattr(obj, part)
    return obj


def _read_dims(spec: AdapterSpec, model: Any, source: _Source) -> Dims | None:
    values: dict[str, int] = {}
    for key, raw in spec.dims.model_dump().items():
        if raw is None:
            continue
        try:
            value = raw if isinstance(raw, int) else _attr(model, raw)
        except AttributeError as e:
            source.add(("dims", key), f"cannot read {raw!r} from the model: {e}")
            continue
        least = 1 if key == "n_layers" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            source.add(("dims", key), f"expected an integer >= {least}, found {value!r}")
            continue
        values[key] = value
    if len(values) < sum(v is not None for v in spec.dims.model_dump().values()):
        return None
    n_heads, n_kv = values["n_heads"], values.get("n_kv_heads") or values["n_heads"]
    if n_heads and (n_kv > n_heads or n_heads % n_kv):
        source.add(
            ("dims", "n_kv_heads"),
            f"{n_kv} key/value heads cannot serve {n_heads} query heads evenly",
        )
        return None
    return Dims(**values)


def _dims_or_raise(spec: AdapterSpec, model: Any, label: str) -> Dims:
    source = _Source(label, None, [])
    dims = _read_dims(spec, model, source)
    if dims is None:
        raise source.error()
    return dims


def _check_site(
    kind: str, entry: str | SiteHook, d: Dims, modules: dict[str, Any], source: _Source
) -> Hook | None:
    hook = SiteHook(module=entry) if isinstance(entry, str) else entry
    at = ("sites", kind) if isinstance(entry, str) else ("sites", kind, "module")
    fields = set() if isinstance(entry, str) else entry.model_fields_set
    if kind not in HEAD_PARTS and fields & {"block", "layout"}:
        source.add(("sites", kind), "block and layout apply to q, k and v sites only")
        return None
    try:
        keys = {f for _, f, _, _ in string.Formatter().parse(hook.module) if f is not None}
    except ValueError as e:
        source.add(at, f"bad module template {hook.module!r}: {e}")
        return None
    per_layer = kind not in GLOBAL_KINDS
    if keys - {"layer"} or (per_layer and "layer" not in keys and d.n_layers > 1):
        need = "needs {layer} (one module per layer)" if per_layer else "takes no placeholders"
        source.add(at, f"module template {hook.module!r}: a {kind!r} site {need}")
        return None
    if kind in HEAD_KINDS and not (d.n_heads and d.d_head):
        source.add(("sites", kind), "head sites need dims.n_heads and dims.d_head > 0")
        return None
    for layer in range(d.n_layers if per_layer else 1):
        path = hook.module.format(layer=layer)
        if path not in modules:
            near = difflib.get_close_matches(path, [m for m in modules if m], n=3)
            source.add(
                at,
                f"no module {path!r} in the model"
                + (f" (layer {layer})" if per_layer else "")
                + (f"; close: {', '.join(near)}" if near else ""),
            )
            return None
    made = Hook(hook.module, hook.io, hook.block, 3 if hook.layout == "heads" else 0, hook.shared)
    if kind in HEAD_KINDS:
        _check_width(kind, made, d, modules[hook.module.format(layer=0)], source)
    return made


def _check_width(kind: str, hook: Hook, d: Dims, module: Any, source: _Source) -> None:
    """A head-by-head layout needs one kv head per query head; in a Linear module, the last
    head's columns must fit in its input/output width."""
    if hook.per_head and d.gqa:
        source.add(("sites", kind, "layout"), "layout 'heads' needs n_kv_heads == n_heads")
        return
    width = getattr(module, "out_features" if hook.io == "output" else "in_features", None)
    if not isinstance(width, int):
        return
    last = (d.n_kv_heads if kind in ("k", "v") else d.n_heads) - 1
    need = head_start(hook, d, last) + d.d_head
    if need > width:
        source.add(
            ("sites", kind),
            f"{kind!r} heads need columns up to {need}, but {hook.module!r} has {width} "
            f"({hook.io}); check block, layout and dims",
        )
