"""The site vocabulary: one naming scheme for model components across architectures.

Canonical names (TransformerLens users will recognise them; ``blocks.1.hook_resid_pre`` style aliases
are accepted and normalised):

==================  ============================================================
``embed``           token embedding output
``L{l}.resid_pre``  residual stream entering block ``l``
``L{l}.resid_mid``  residual stream after attention, before the MLP
``L{l}.resid_post`` residual stream leaving block ``l``
``L{l}.attn_out``   attention output written to the residual stream
``L{l}.mlp_in``     the MLP's input (after its layer norm, where the family has one)
``L{l}.mlp_out``    MLP output written to the residual stream
``L{l}.H{h}``       head ``h``'s output ``z`` (before the output projection)
``L{l}.H{h}:q``     head ``h``'s query (also ``:k``, ``:v``)
``L{l}.KV{g}:k``    key/value head ``g``'s key (also ``:v``): grouped-query attention models name
                    keys and values by kv head, each serving ``n_heads / n_kv_heads`` query heads
``logits``          unembedding output
``path:a.b.c``      raw module path, its output (``path:a.b.c.input`` for its input)
==================  ============================================================

A site may carry a position after ``@``: ``L1.H2@last``, ``L0.resid_post@-1``. Pure, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYER_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out")
GLOBAL_KINDS = ("embed", "logits")
HEAD_PARTS = ("q", "k", "v")

_LAYER_RE = re.compile(r"^L(?P<layer>\d+)\.(?P<kind>[a-z_]+)$")
_HEAD_RE = re.compile(r"^L(?P<layer>\d+)\.H(?P<head>\d+)(?::(?P<part>[a-z]+))?$")
_KV_RE = re.compile(r"^L(?P<layer>\d+)\.KV(?P<head>\d+)(?::(?P<part>[a-z]+))?$")
_TL_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.(?:attn\.)?hook_(?P<kind>[a-z_]+)$")
_TL_ALIASES = {
    "hook_embed": "embed",
    "embed": "embed",
    "logits": "logits",
    "unembed": "logits",
}
_TL_LAYER = {
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "mlp_in": "mlp_in",
}


class SiteSyntaxError(ValueError):
    """A site string that is not in the vocabulary."""


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site. ``kind`` is one of LAYER_KINDS, GLOBAL_KINDS, ``head``, ``kv_head``, ``path``.

    For ``kv_head`` (``L1.KV0:k``), ``head`` is the key/value head index and ``part`` is k or v.
    """

    kind: str
    layer: int | None = None
    head: int | None = None
    part: str | None = None  # q | k | v for head inputs; None for the head output z
    path: str | None = None  # raw module path (kind == "path")
    io: str = "output"  # raw paths only: "input" or "output"

    @property
    def name(self) -> str:
        """The canonical spelling."""
        if self.kind == "path":
            return f"path:{self.path}" + (".input" if self.io == "input" else "")
        if self.kind in GLOBAL_KINDS:
            return self.kind
        if self.kind == "head":
            return f"L{self.layer}.H{self.head}" + (f":{self.part}" if self.part else "")
        if self.kind == "kv_head":
            return f"L{self.layer}.KV{self.head}:{self.part}"
        return f"L{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


def split_position(text: str) -> tuple[str, str | int | None]:
    """``"L1.H2@last"`` -> ``("L1.H2", "last")``; integers come back as ints."""
    if "@" not in text:
        return text.strip(), None
    site, pos = text.rsplit("@", 1)
    pos = pos.strip()
    if re.fullmatch(r"-?\d+", pos):
        return site.strip(), int(pos)
    return site.strip(), pos


def parse_site(text: str) -> Site:
    """Parse a site name (canonical, TransformerLens alias, or ``path:``) without a position."""
    s = text.strip()
    if s.startswith("path:"):
        path = s[len("path:") :]
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", path):
            raise SiteSyntaxError(f"raw site {s!r}: expected a dotted module path after 'path:'")
        if path.endswith(".input"):
            return Site(kind="path", path=path[: -len(".input")], io="input")
        if path.endswith(".output"):
            path = path[: -len(".output")]
        return Site(kind="path", path=path)
    if s in GLOBAL_KINDS or s in _TL_ALIASES:
        return Site(kind=_TL_ALIASES.get(s, s))
    if m := _HEAD_RE.match(s):
        part = m["part"]
        if part is not None and part not in HEAD_PARTS:
            raise SiteSyntaxError(f"site {s!r}: head part must be one of q, k, v, got {part!r}")
        return Site(kind="head", layer=int(m["layer"]), head=int(m["head"]), part=part)
    if m := _KV_RE.match(s):
        if m["part"] not in ("k", "v"):
            raise SiteSyntaxError(
                f"site {s!r}: a key/value head has keys and values only: name "
                f"L{m['layer']}.KV{m['head']}:k or L{m['layer']}.KV{m['head']}:v "
                "(queries and outputs are per query head: L<l>.H<h>:q, L<l>.H<h>)"
            )
        return Site(kind="kv_head", layer=int(m["layer"]), head=int(m["head"]), part=m["part"])
    if m := _LAYER_RE.match(s):
        if m["kind"] not in LAYER_KINDS:
            raise SiteSyntaxError(
                f"site {s!r}: unknown layer site {m['kind']!r}; expected one of "
                + ", ".join(LAYER_KINDS)
                + " or H<head>"
            )
        return Site(kind=m["kind"], layer=int(m["layer"]))
    if (m := _TL_RE.match(s)) and m["kind"] in _TL_LAYER:
        return Site(kind=_TL_LAYER[m["kind"]], layer=int(m["layer"]))
    raise SiteSyntaxError(
        f"site {s!r} is not in the vocabulary: expected e.g. 'embed', 'L0.resid_post', "
        "'L1.attn_out', 'L1.mlp_out', 'L1.H3', 'L1.H3:q', 'L1.KV0:k', 'logits' or "
        "'path:module.path'"
    )


def expand_patterns(patterns: list[str], vocabulary: list[str]) -> list[str]:
    """Expand ``*`` wildcards (``L*.H*``, ``L1.*``) against ``vocabulary``, keeping order, no dupes.

    ``*`` matches within one name segment (not across ``.`` ``:`` ``[``), so ``L*.H*`` means head
    outputs and not their q/k/v, and ``L1.*`` no subspace sites; ``L1.resid_pre[sae:*]`` is each
    coordinate of subspace ``sae`` (when the vocabulary lists them). Names without ``*`` pass through unchecked (binding checks them).
    """
    out: list[str] = []
    for pattern in patterns:
        if "*" not in pattern:
            matches = [pattern]
        else:
            rx = re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.:\[\]]*") + "$")
            matches = [name for name in vocabulary if rx.match(name)]
            if not matches:
                hint = ""
                if re.search(r"\.H[^.:]*:[kv]$", pattern) and any(".KV" in n for n in vocabulary):
                    hint = " (it uses grouped-query attention: keys and values are per kv head, "
                    hint += "e.g. L*.KV*:k, L*.KV*:v)"
                raise SiteSyntaxError(
                    f"site pattern {pattern!r} matches no site of this model{hint}"
                )
        out += [m for m in matches if m not in out]
    return out
