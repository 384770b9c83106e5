"""The hypothesis's ``subspaces:`` section resolved: each name -> a :class:`SubspaceRef` (files
found, read once, digested) and the site it lives at; and ``site[name]`` bound on top of a site.

Loading a subspace here (the driver) checks at validate time what a worker would find at run time:
a missing file, a basis that is not d x k, an SAE whose tensors disagree with its cfg.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from mi_spec.errors import ResolveError
from mi_spec.experiments.scrub_tree import cut_of
from mi_spec.sites.adapter import Dims, SiteBinding
from mi_spec.sites.subspace_ref import NAME, SubspaceRef, split_subspace
from mi_spec.spec.sections import RunArtifact, SubspaceSection


@dataclass(frozen=True)
class Declared:
    """A resolved ``subspaces:`` entry: the reference (every declared coordinate) and its site."""

    ref: SubspaceRef
    site: str | None  # where it lives (declared, or the SAE's hook point / the rotation's site)
    indices: tuple[int, ...]  # the coordinates it declares, in the file's numbering
    warnings: list[str] = field(default_factory=list)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _fetch(rotation: str | RunArtifact, base: Path) -> Path:
    if isinstance(rotation, str):
        return base / rotation
    try:
        import mlflow

        got = mlflow.artifacts.download_artifacts(
            run_id=rotation.run, artifact_path=rotation.artifact
        )
    except Exception as e:  # noqa: BLE001 (any tracking-server failure, reported at the field)
        raise ResolveError(
            f"MLflow run {rotation.run!r} artifact {rotation.artifact!r} could not be fetched "
            f"from {_tracking_uri()}: {type(e).__name__}: {e}"
        ) from None
    return Path(got)


def _tracking_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def declare(name: str, section: SubspaceSection, base: Path) -> Declared:
    """Load and check one ``subspaces:`` entry (ResolveError: what is wrong with it)."""
    if not NAME.match(name):
        raise ResolveError(f"subspace name {name!r}: use letters, digits, _ and - only")
    kind = section.source
    raw = section.basis or section.sae or section.rotation
    path = _fetch(raw, base) if kind == "rotation" else base / str(raw)  # type: ignore[arg-type]
    if not path.exists():
        raise ResolveError(f"{kind} {str(path)!r} not found")
    warnings: list[str] = []
    site = section.site
    try:
        if kind == "sae":
            from mi_spec.features.sae import load_sae, sae_site

            sae = load_sae(path)
            total, d_model = sae.d_sae, sae.d_in
            hooked = sae_site(sae.hook_name)
            if site is not None and site != hooked:
                raise ResolveError(
                    f"the SAE in {str(path)!r} reads {sae.hook_name} ({hooked}), not {site}"
                )
            site = hooked
        elif kind == "basis":
            from mi_spec.features.basis import load_basis

            basis, warnings = load_basis(path)
            d_model, total = basis.shape
        else:
            from mi_spec.features.basis import rotation_basis

            basis, info = rotation_basis(path, section.variable)
            d_model, total = basis.shape
            saved = str(info.get("site") or "").split("@")[0] or None
            if site is not None and saved is not None and not same_point(site, saved):
                warnings.append(f"rotation {str(path)!r} was learned at {saved}, used at {site}")
            site = site or saved
    except ResolveError:
        raise
    except (ValueError, OSError, KeyError) as e:
        raise ResolveError(str(e)) from None
    indices = tuple(section.features) if section.features is not None else tuple(range(total))
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        what = "features" if kind == "sae" else "columns"
        raise ResolveError(
            f"{what} {bad[:5]} out of range: {str(path)!r} has {total} (0..{total - 1})"
        )
    ref = SubspaceRef(
        name=name,
        kind=kind,
        path=str(path.resolve()),
        width=len(indices),
        d_model=int(d_model),
        digest=_digest(path),
        variable=section.variable,
        select=None if section.features is None else indices,
    )
    return Declared(ref, site, indices, warnings)


def same_point(a: str, b: str) -> bool:
    """The same site, or the same residual point under two names (``L0.resid_post`` and
    ``L1.resid_pre``: one tensor between two blocks)."""
    depth = cut_of(a)
    return a == b or (depth is not None and depth == cut_of(b))


def site_names(declared: dict[str, Declared]) -> list[str]:
    """The vocabulary subspace sites add: ``site[name]`` and ``site[name:i]`` per coordinate."""
    out = []
    for name, d in declared.items():
        if d.site is not None:
            out += [f"{d.site}[{name}]"] + [f"{d.site}[{name}:{i}]" for i in d.indices]
    return out


def bind_subspace(text: str, declared: dict[str, Declared], bind_plain, dims: Dims) -> SiteBinding:
    """Bind ``site[name]`` / ``site[name:i]``: the plain site's binding carrying the subspace."""
    try:
        site, name, index = split_subspace(text)
    except ValueError as e:
        raise ResolveError(str(e)) from None
    plain: SiteBinding = bind_plain(site)
    if name is None:
        return plain
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none are declared (add a `subspaces:` section)"
        raise ResolveError(f"site {text!r}: unknown subspace {name!r}; subspaces: {known}")
    d = declared[name]
    if d.site is not None and not same_point(d.site, site):
        raise ResolveError(f"site {text!r}: subspace {name!r} lives at {d.site}, not {site}")
    width = plain.width
    if width is None and not site.startswith("path:"):
        width = dims.d_vocab if site == "logits" else dims.d_model
    if width is not None and width != d.ref.d_model:
        raise ResolveError(
            f"site {text!r}: subspace {name!r} is {d.ref.d_model} wide but {site} has {width} "
            "columns"
        )
    ref = d.ref
    if index == "*":
        raise ResolveError(f"site {text!r}: [name:*] is a pattern; it expands only in site lists")
    if index is not None:
        if index not in d.indices:
            raise ResolveError(
                f"site {text!r}: coordinate {index} is not one of subspace {name!r}'s "
                f"({_span(d.indices)})"
            )
        ref = ref.model_copy(update={"select": (index,), "width": 1})
    return plain.model_copy(update={"name": text, "subspace": ref})


def _span(indices: tuple[int, ...]) -> str:
    if indices == tuple(range(len(indices))):
        return f"0..{len(indices) - 1}"
    shown = ", ".join(map(str, indices[:8]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 8 else "")
