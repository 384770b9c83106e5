"""``mi-spec validate --static``: review a hypothesis file without running any of its code.

A hypothesis file is code: ``factory: pkg.mod:fn`` runs ``fn``. This check reads an untrusted file
and imports nothing it names outside mi_spec itself, and loads no weights:

- the schema (every field, all problems at once, located);
- every reference (``model.factory``, ``data.generator``, variables' ``fn``): its module is found
  on disk (``sys.path``, then the file's folder) and the attribute is looked up in the module's
  source (parsed, not executed); mi_spec's own references are imported (they are this package);
- the files it names (data, checkpoint, hf folder, adapter) exist;
- every ``value:`` expression parses under the restricted grammar, and the variables form no cycle;
- every site (experiments, correspondence) against the adapter's declared shapes, where the model's
  structure is known without user code: ``hf_config``, an ``hf`` folder's ``config.json``, or a
  mi_spec factory; the model is built on the ``meta`` device (no memory, no weights, no
  initialisation).
"""

from __future__ import annotations

import ast
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from mi_spec.causal.values import names as expression_names
from mi_spec.errors import MiSpecError, ResolveError, SpecError, SpecIssue
from mi_spec.sites.subspace_ref import split_subspace
from mi_spec.sites.vocabulary import SiteSyntaxError, expand_patterns, split_position
from mi_spec.spec.load import LoadedDoc
from mi_spec.spec.locate import issue_at
from mi_spec.spec.refs import import_ref, is_ref, module_file

from .resolve import load_spec
from .spec import Spec

SITE_FIELDS = ("sites", "site", "senders", "receivers")  # experiment fields that name sites
OWN_PACKAGE = "mi_spec"


@dataclass
class StaticReport:
    """What a static check looked at, and what it could not check without running code."""

    references: list[str] = field(default_factory=list)  # "field = ref (where it was found)"
    expressions: int = 0
    sites: int = 0
    notes: list[str] = field(default_factory=list)


def check_static(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StaticReport:
    """Check ``path`` without importing its code or loading a model; SpecError lists every issue."""
    spec, doc = load_spec(path, overrides)
    base = doc.path.parent
    report, issues = StaticReport(), []
    for where, ref in _references(spec):
        found, problem = _check_ref(ref, base)
        report.references.append(f"{'.'.join(map(str, where))} = {ref} ({found})")
        if problem:
            issues.append(issue_at(doc, where, problem))
    issues += _check_files(spec, doc)
    issues += _check_variables(spec, doc, report)
    issues += _check_sites(spec, doc, report)
    if issues:
        raise SpecError(issues)
    return report


# --- references ------------------------------------------------------------------------------


def _references(spec: Spec) -> Iterator[tuple[tuple, str]]:
    if spec.model.factory:
        yield ("model", "factory"), spec.model.factory
    if spec.data.generator:
        yield ("data", "generator"), spec.data.generator
    if spec.data.tokenizer and is_ref(spec.data.tokenizer):  # a tokenizer built by code
        yield ("data", "tokenizer"), spec.data.tokenizer
    for name, var in spec.variables.items():
        if var.fn:
            yield ("variables", name, "fn"), var.fn


def _check_ref(ref: str, base: Path) -> tuple[str, str | None]:
    """Where ``ref``'s module lives, and a problem with ``ref`` (None if none), found without
    executing any module outside mi_spec."""
    module, _, attrs = ref.partition(":")
    own = module == OWN_PACKAGE or module.startswith(OWN_PACKAGE + ".")
    top = module.split(".")[0]
    if top in sys.builtin_module_names:
        return "built into Python", None
    # mi_spec's own modules are looked up like any other (importing the zoo would import torch)
    folders = [str(Path(__file__).parents[2])] if own else [p for p in sys.path if p] + [str(base)]
    source = module_file(module, folders)
    if source is None:
        if _extension_module(module, folders):
            return "a compiled extension module", None
        return "not found", (
            f"cannot find module {module!r} on sys.path or in {base} (looked for its file; "
            "nothing was imported)"
        )
    first = attrs.split(".")[0]
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    except (SyntaxError, UnicodeDecodeError, ValueError) as e:
        return str(source), f"module {module!r} ({source}) does not parse: {e}"
    defined, dynamic = _top_level_names(tree)
    where = "mi_spec" if own else str(source)
    if first in defined or dynamic or (source.name == "__init__.py" and _submodule(source, first)):
        return where, None
    return where, f"module {module!r} ({source}) defines no top-level name {first!r}"


def _extension_module(module: str, folders: list[str]) -> bool:
    parts = module.split(".")
    for folder in folders:
        base = Path(folder).joinpath(*parts)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if base.with_name(base.name + suffix).is_file():
                return True
    return False


def _submodule(init: Path, name: str) -> bool:
    return (init.parent / f"{name}.py").is_file() or (init.parent / name / "__init__.py").is_file()


def _top_level_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names a module's source defines at top level; True if it may define others dynamically
    (``from x import *`` or a module ``__getattr__``)."""
    defined: set[str] = set()
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    dynamic = True
                else:
                    defined.add((alias.asname or alias.name).split(".")[0])
    return defined, dynamic or "__getattr__" in defined


# --- files and variables ---------------------------------------------------------------------


def _check_files(spec: Spec, doc: LoadedDoc) -> list[SpecIssue]:
    base = doc.path.parent
    wanted: list[tuple[tuple, str | None]] = [
        (("model", "checkpoint"), spec.model.checkpoint),
        (("model", "hf"), spec.model.hf),
        (("data", "path"), spec.data.path),
        (("data", "tokenizer"), None if is_ref(spec.data.tokenizer or "") else spec.data.tokenizer),
    ]
    adapter = spec.model.adapter
    if isinstance(adapter, str) and adapter.endswith((".yaml", ".yml")):
        wanted.append((("model", "adapter"), adapter))
    for name, sub in spec.subspaces.items():  # a rotation from an MLflow run: checked at load
        file = sub.basis or sub.sae or (sub.rotation if isinstance(sub.rotation, str) else None)
        wanted.append((("subspaces", name, sub.source), file))
    issues = []
    for where, value in wanted:
        if (
            value is not None
            and not (Path(value) if Path(value).is_absolute() else base / value).exists()
        ):
            issues.append(issue_at(doc, where, f"file not found: {base / value}"))
    return issues


def _check_variables(spec: Spec, doc: LoadedDoc, report: StaticReport) -> list[SpecIssue]:
    """Expressions parse; the variables' graph has no cycle (columns are not known statically)."""
    issues, graph = [], nx.DiGraph()
    for name, var in spec.variables.items():
        graph.add_node(name)
        reads: list[str] = list(var.parents)
        if var.value is not None:
            report.expressions += 1
            try:
                reads = sorted(expression_names(var.value) - {"pos"})
            except MiSpecError as e:
                issues.append(issue_at(doc, ("variables", name, "value"), str(e)))
        graph.add_edges_from((r, name) for r in reads if r in spec.variables)
    with suppress(nx.NetworkXNoCycle):
        cycle = nx.find_cycle(graph)
        text = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        issues.append(issue_at(doc, ("variables", cycle[0][1]), f"variables form a cycle: {text}"))
    return issues


# --- sites -----------------------------------------------------------------------------------


def _check_sites(spec: Spec, doc: LoadedDoc, report: StaticReport) -> list[SpecIssue]:
    model, why_not = _meta_model(spec, doc.path.parent)
    if model is None:
        report.notes.append(f"sites not checked: {why_not}")
        return []
    from mi_spec.sites.adapter import bind_site
    from mi_spec.sites.declarative import pick_adapter

    try:
        adapter = pick_adapter(model, spec.model.adapter, doc.path.parent)
        vocabulary = adapter.vocabulary(model)
    except MiSpecError as e:
        return [issue_at(doc, ("model", *getattr(e, "field", ())), str(e))]
    issues = []
    for where, text in _site_fields(spec):
        site, _ = split_position(text)
        try:
            site, space, _ = split_subspace(site)
            if space is not None and space not in spec.subspaces:
                known = ", ".join(sorted(spec.subspaces)) or "none are declared"
                raise ResolveError(f"site {text!r}: unknown subspace {space!r}; subspaces: {known}")
            for name in expand_patterns([site], vocabulary):
                bind_site(adapter, model, name)
                report.sites += 1
        except (MiSpecError, SiteSyntaxError, ValueError) as e:
            issues.append(issue_at(doc, where, str(e)))
    return issues


def _site_fields(spec: Spec) -> Iterator[tuple[tuple, str]]:
    for var, sites in spec.correspondence.items():
        for i, text in enumerate(sites):
            yield ("correspondence", var, i), text
    for i, exp in enumerate(spec.experiments):
        for key, value in exp.model_dump(mode="json").items():
            if key not in SITE_FIELDS:
                continue
            items = value if isinstance(value, list) else [value]
            for j, text in enumerate(items):
                if isinstance(text, str):
                    where = (
                        ("experiments", i, key, j)
                        if isinstance(value, list)
                        else ("experiments", i, key)
                    )
                    yield where, text


def _meta_model(spec: Spec, base: Path) -> tuple[Any, str]:
    """The model's structure on the meta device, when it is known without user code."""
    section = spec.model
    if section.factory and not section.factory.startswith(OWN_PACKAGE + "."):
        return None, f"the model comes from user code ({section.factory})"
    if section.factory:  # a bundled model: its structure is known without torch
        from mi_spec.zoo.skeletons import skeleton

        if (found := skeleton(section.factory, section.kwargs)) is not None:
            return found, ""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bundled checkpoints load as no-ops on meta
            if section.factory:
                fn = import_ref(section.factory)
                with _parameters_on_meta():
                    return fn(**section.kwargs), ""
            from transformers import AutoConfig, AutoModelForCausalLM

            if section.hf is not None:
                folder = Path(section.hf) if Path(section.hf).is_absolute() else base / section.hf
                config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            else:
                params = dict(section.hf_config or {})
                config = AutoConfig.for_model(params.pop("model_type"), **params)
            with torch.device("meta"):  # transformers imports torch._dynamo anyway
                return AutoModelForCausalLM.from_config(config), ""
    except Exception as e:  # a broken config: the full validate reports it with its location
        return None, f"the model's structure could not be built ({type(e).__name__}: {e})"


# Initialisers that fill a tensor in place: on a meta tensor they have nothing to fill, and torch
# (2.13) runs several of them (``normal_``, ...) through Python references that import
# torch._dynamo (~1.5 s) on first use.
_INIT_NAMES = [
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
]
_TENSOR_FILLS = [
    "normal_",
    "uniform_",
    "exponential_",
    "log_normal_",
    "cauchy_",
    "geometric_",
    "random_",
]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a module with its parameters on the meta device and their initialisation skipped.

    Each parameter is created as an empty (untouched) CPU tensor and moved to meta as it is
    registered; initialisers (``torch.nn.init.*_`` and ``Tensor.normal_``-like fills) on meta
    tensors return at once. Everything else runs on its own device, so buffers (a causal mask)
    stay small real tensors, and no meta kernel that needs torch._dynamo is reached. Not thread
    safe: ``nn.Module.register_parameter`` is replaced for the duration.
    """
    import torch
    from torch import nn
    from torch.overrides import TorchFunctionMode

    skipped = {getattr(nn.init, n) for n in _INIT_NAMES if hasattr(nn.init, n)}
    skipped |= {getattr(torch.Tensor, n) for n in _TENSOR_FILLS if hasattr(torch.Tensor, n)}

    class SkipInit(TorchFunctionMode):
        def __torch_function__(
            self,
            func: Callable[..., Any],
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            kwargs = kwargs or {}
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if func in skipped and isinstance(target, torch.Tensor) and target.is_meta:
                return target
            return func(*args, **kwargs)

    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with SkipInit():
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
