"""Subspace sites as plain data: ``L1.resid_pre[sae]`` names subspace ``sae`` of site ``L1.resid_pre``,
``L1.resid_pre[sae:12]`` its coordinate 12 alone. No torch: a :class:`SubspaceRef` travels in Plans
and the worker loads the tensors (``mi_spec/features/load.py``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

_SUFFIX = re.compile(r"^(?P<site>.+?)\[(?P<name>[A-Za-z_][\w\-]*)(?::(?P<index>\d+|\*))?\]$")
NAME = re.compile(r"^[A-Za-z_][\w\-]*$")


class SubspaceRef(BaseModel):
    """Where a subspace's tensors are and which coordinates of it a site uses.

    ``kind``: ``basis`` (an orthonormal d x k file), ``rotation`` (``variable``'s block of a DAS
    rotation), or ``sae`` (features of a sparse autoencoder folder). ``select``: indices into the
    subspace's coordinates (SAE features, basis columns), None for all. ``digest`` hashes the files'
    contents, so a changed file changes the job ids that use it (and misses the cache)."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Literal["basis", "rotation", "sae"]
    path: str
    width: int  # coordinates used: len(select), or the subspace's whole width
    d_model: int  # the width of the site activation it lives in
    digest: str
    variable: str | None = None
    select: tuple[int, ...] | None = None


def split_subspace(text: str) -> tuple[str, str | None, int | str | None]:
    """``"L1.resid_pre[sae:3]"`` -> ``("L1.resid_pre", "sae", 3)``; ``[sae:*]`` -> ``"*"``;
    a site without a subspace -> ``(text, None, None)``."""
    text = text.strip()
    if not text.endswith("]"):
        return text, None, None
    m = _SUFFIX.match(text)
    if m is None:
        raise ValueError(
            f"site {text!r}: a subspace is written site[name] or site[name:index] "
            "(name: letters, digits, _ or -)"
        )
    index = m["index"]
    return m["site"], m["name"], (int(index) if index and index != "*" else index)
