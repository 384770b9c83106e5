"""Spec -> resolved study: the loaded model, the dataset, named positions and site bindings.

All problems found here are reported together, located in the hypothesis file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from mi_spec.causal.graph import CausalModel
from mi_spec.data.dataset import Dataset, load_dataset
from mi_spec.data.positions import position_table
from mi_spec.errors import MiSpecError, ResolveError, SpecError, SpecIssue
from mi_spec.sites.adapter import Dims, SiteBinding, bind_site
from mi_spec.sites.vocabulary import split_position
from mi_spec.spec.load import LoadedDoc, load_yaml
from mi_spec.spec.locate import issue_at, issues_from_validation_error
from mi_spec.spec.sections import PositionSpec

from .spec import Spec
from .subspaces import Declared, bind_subspace, declare, site_names

if TYPE_CHECKING:  # torch is imported when a model is loaded, not by `validate --static`
    from mi_spec.models.attention_probe import AttentionPattern
    from mi_spec.models.load import LoadedModel


@dataclass
class Study:
    """A validated spec with everything it names loaded."""

    spec: Spec
    doc: LoadedDoc
    model: LoadedModel
    data: Dataset
    positions: dict[str, PositionSpec]
    dims: Dims
    vocabulary: list[str] = field(default_factory=list)
    causal: CausalModel | None = None
    subspaces: dict[str, Declared] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """Things resolved with a caveat (a basis file orthonormalised, ...)."""
        return [f"subspace {n}: {w}" for n, d in self.subspaces.items() for w in d.warnings]

    @property
    def base_dir(self) -> Path:
        return self.doc.path.parent

    def bind(self, site: str) -> SiteBinding:
        """Bind a site name, ``site[subspace]`` included, on this model."""
        return bind_subspace(site, self.subspaces, self._bind_plain, self.dims)

    def _bind_plain(self, site: str) -> SiteBinding:
        return bind_site(self.model.adapter, self.model.skeleton, site)

    def attention(self) -> AttentionPattern:
        """The model's attention pattern (``models/attention_probe.py``), probed on first use."""
        from mi_spec.models.attention_probe import attention_pattern

        return attention_pattern(self.model, self.dims)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Spec, LoadedDoc]:
    """Read, merge and validate a hypothesis file; every problem at once, located."""
    doc = load_yaml(path, overrides)
    try:
        return Spec.model_validate(doc.data), doc
    except ValidationError as e:
        raise SpecError(issues_from_validation_error(e, doc, Spec)) from None


def resolve(spec: Spec, doc: LoadedDoc) -> Study:
    """Load the model and data, then check every site and position the spec names.

    An ``hf:`` model is resolved from its structure alone (meta device, identity from its
    files); its weights load only when something runs it (site checks, in-process jobs)."""
    base = doc.path.parent
    try:
        from mi_spec.models.load import load_model

        model = load_model(spec.model, base, lazy=True)
    except MiSpecError as e:
        raise SpecError([issue_at(doc, ("model", *getattr(e, "field", ())), str(e))]) from None
    try:
        data = load_dataset(spec.data, base, model.hf_dir)
    except MiSpecError as e:
        raise SpecError([issue_at(doc, ("data", *getattr(e, "field", ())), str(e))]) from None
    dims = model.adapter.dims(model.skeleton)
    study = Study(
        spec,
        doc,
        model,
        data,
        position_table(dict(spec.data.positions)),
        dims,
        model.adapter.vocabulary(model.skeleton),
    )
    issues = []
    for name, section in spec.subspaces.items():
        try:
            study.subspaces[name] = declare(name, section, base)
        except MiSpecError as e:
            issues.append(issue_at(doc, ("subspaces", name), str(e)))
    study.vocabulary += site_names(study.subspaces)
    issues += _check_correspondence(study)
    try:
        study.causal = CausalModel(spec.variables, set(data.columns))
    except MiSpecError as e:
        issues.append(issue_at(doc, ("variables", *getattr(e, "field", ())), str(e)))
    if issues:
        raise SpecError(issues)
    return study


def _check_correspondence(study: Study) -> list[SpecIssue]:
    issues = []
    for var, sites in study.spec.correspondence.items():
        for i, text in enumerate(sites):
            site, pos = split_position(text)
            try:
                study.bind(site)
                if pos is not None and pos not in study.positions and not isinstance(pos, int):
                    raise ResolveError(
                        f"unknown position {pos!r}; named positions: "
                        + ", ".join(sorted(study.positions))
                    )
            except (ResolveError, ValueError) as e:
                issues.append(issue_at(study.doc, ("correspondence", var, i), str(e)))
    return issues
