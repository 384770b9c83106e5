"""Which positions a model's attention lets each position read: probed, cached per model.

Causal scrubbing's trees (``experiments/scrub_tree.py``) give a head its inputs at every position
it can see, so they need the model's attention pattern. The probe measures it directly, layer by
layer, in one forward pass on a short row of random token ids (two rows, seeded): every layer's
input (``L{l}.resid_pre``) is overwritten with its clean value, except at one position q where it
gets a random perturbation (one batch row per q, plus an unperturbed one); the layer's head
outputs (the input of the heads' output projection) at each position p then changed iff a head
at p reads q. Overwriting every layer's input decouples the layers, so each is measured alone.

Per layer: ``causal`` (no position reads a later one: causal masks, sliding windows) or
``bidirectional`` (some position reads a later one). The model is ``bidirectional`` when one layer
is; causal scrubbing then gives a head its inputs at every position of the row, which is exact for
any pattern of attention within a row (a superset of what it reads). The same pass checks that a
head's query input (``L{l}.H0:q``, a reader the trees treat as position-local) reads only its own
position: a model that mixes positions outside attention (a convolution, a token shift) is
``other``, which no treeification here models. A model whose weights are not loaded (a lazy
``hf:`` structure) or that lacks ``resid_pre`` / head sites is read from its modules'
``is_causal`` flags and class instead (``source: config``); nothing is ever loaded for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from mi_spec.models.load import LoadedModel
    from mi_spec.sites.adapter import Dims

Kind = Literal["causal", "bidirectional", "other", "unknown"]
PROBE_LENGTH = 6  # tokens per probe row (fewer when the model's context is shorter)


@dataclass(frozen=True)
class AttentionPattern:
    """What the model's attention lets a position read; ``layers``: one kind per probed layer."""

    kind: Kind
    source: Literal["probe", "config", "none"]
    layers: tuple[str, ...] = ()
    detail: str = ""  # for ``other`` / ``unknown``: what was seen

    def describe(self) -> str:
        how = {"probe": "probed", "config": "read from the model's config", "none": "no heads"}
        text = f"{self.kind} attention ({how[self.source]})"
        return f"{text}: {self.detail}" if self.detail else text


_CACHE: dict[str, AttentionPattern] = {}


def attention_pattern(model: LoadedModel, dims: Dims) -> AttentionPattern:
    """The model's attention pattern, probed once per model identity (weights hash, adapter)."""
    key = f"{model.weights_hash}:{model.adapter.name}:{model.loaded}"
    if key not in _CACHE:
        _CACHE[key] = _measure(model, dims)
    return _CACHE[key]


def _measure(model: LoadedModel, dims: Dims) -> AttentionPattern:
    if dims.n_heads == 0 or dims.n_layers == 0:
        return AttentionPattern("causal", "none")
    table = model.adapter.table
    if not model.loaded or "resid_pre" not in table or "head" not in table:
        return from_config(model.skeleton)
    return probe(model.module, model.adapter, dims, model.n_input_ids, model.n_ctx)


def from_config(module: Any) -> AttentionPattern:
    """From the attention modules' ``is_causal`` flags, or a ``*ForCausalLM`` class."""
    flags = {
        m.is_causal for m in module.modules() if isinstance(getattr(m, "is_causal", None), bool)
    }
    name = type(module).__name__
    if flags == {True} or (not flags and name.endswith("ForCausalLM")):
        return AttentionPattern("causal", "config")
    if flags == {False}:
        return AttentionPattern("bidirectional", "config")
    return AttentionPattern(
        "unknown", "config", detail=f"{name} has no readable causal flag and could not be probed"
    )


def probe(
    module: torch.nn.Module,
    adapter: Any,
    dims: Dims,
    n_input_ids: int | None = None,
    n_ctx: int | None = None,
) -> AttentionPattern:
    """Measure each layer's pattern (see the module docstring): one clean and one probe pass."""
    import torch

    from mi_spec.sites.adapter import bind_site

    length = min(PROBE_LENGTH, n_ctx or PROBE_LENGTH)
    gen = torch.Generator().manual_seed(0)
    first = next(module.parameters())
    ids = torch.randint(n_input_ids or dims.d_vocab, (2, length), generator=gen)
    ids = ids.to(first.device)
    layers = range(dims.n_layers)
    modules = dict(module.named_modules())
    inputs = [modules[bind_site(adapter, module, f"L{x}.resid_pre").module] for x in layers]
    heads = [bind_site(adapter, module, f"L{x}.H0") for x in layers]
    if "q" in adapter.table:  # the query input: must read only its own position
        heads += [bind_site(adapter, module, f"L{x}.H0:q") for x in layers]
    z_mods = [modules[b.module] for b in heads]
    clean: list[torch.Tensor] = []  # each layer's input on the probe rows
    got: dict[int, torch.Tensor] = {}  # each layer's head outputs
    override: list[torch.Tensor] = []  # each layer's input in the probe pass

    def on_input(i: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if not override:
                clean.append(x.detach().clone())
                return None
            x = override[i].to(dtype=x.dtype)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        return hook

    def on_heads(i: int, io: str):
        def pre(_m, args):
            got[i] = args[0].detach().clone()

        def post(_m, _args, out):
            got[i] = (out if torch.is_tensor(out) else out[0]).detach().clone()

        return pre if io == "input" else post

    handles = []
    try:
        for i, m in enumerate(inputs):
            handles.append(m.register_forward_pre_hook(on_input(i), with_kwargs=True))
        for i, (zm, b) in enumerate(zip(z_mods, heads, strict=True)):
            if b.io == "input":
                handles.append(zm.register_forward_pre_hook(on_heads(i, "input")))
            else:
                handles.append(zm.register_forward_hook(on_heads(i, "output")))
        with torch.no_grad():
            module(ids)
            for x in clean:
                scale = x.float().std().clamp_min(1e-3)
                noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype) * scale * 3
                # per probe row: unperturbed, then one row per perturbed position q
                batch = x.repeat_interleave(length + 1, dim=0).clone()
                for r in range(2):
                    for q in range(length):
                        batch[r * (length + 1) + 1 + q, q] += noise[r, q]
                override.append(batch)
            module(ids.repeat_interleave(length + 1, dim=0))
    finally:
        for h in handles:
            h.remove()
    kinds: list[str] = []
    details: list[str] = []
    for i in range(len(heads)):
        z = got[i].float().reshape(2, length + 1, length, -1)
        change = (z[:, 1:] - z[:, :1]).abs().amax(dim=(0, 3))  # [q, p]
        reads = (change > 1e-4 * float(z.abs().max().clamp_min(1e-6))).T  # [p, q]: p reads q
        n = dims.n_layers
        if i < n:
            later = [(p, q) for p in range(length) for q in range(p + 1, length) if reads[p, q]]
            kinds.append("bidirectional" if later else "causal")
        elif other := [
            (p, q) for p in range(length) for q in range(length) if reads[p, q] and p != q
        ]:
            kinds[i - n] = "other"
            p, q = other[0]
            details.append(
                f"layer {i - n}: the query input {heads[i].name} at position {p} reads position "
                f"{q} (positions mix outside attention)"
            )
    kind: Kind = "causal"
    if "other" in kinds:
        kind = "other"
    elif "bidirectional" in kinds:
        kind = "bidirectional"
    return AttentionPattern(kind, "probe", tuple(kinds), "; ".join(details))
