"""The hypothesis file's sections as pydantic models (the experiment kinds live in ``experiments/``).

Every model forbids unknown keys, so a typo is an error with a suggestion, never silently ignored.
Plain data only: no torch, no imports of user code (``"pkg.mod:fn"`` refs are checked for syntax here
and imported at resolve time).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from mi_spec.spec.refs import is_ref

REF_HELP = "a Python reference 'package.module:function'"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ref(value: str) -> str:
    if not is_ref(value):
        raise ValueError(f"expected {REF_HELP}, found {value!r}")
    return value


Ref = Annotated[str, AfterValidator(_check_ref)]


class ModelSection(Section):
    """Where the model comes from: exactly one of ``factory``, ``hf`` or ``hf_config``."""

    factory: Ref | None = Field(None, description=f"{REF_HELP} that returns a torch.nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Arguments for the factory")
    hf: str | None = Field(
        None, description="A local Hugging Face model directory (from_pretrained, offline)"
    )
    hf_config: dict[str, Any] | None = Field(
        None,
        description="A Hugging Face config (must include model_type); builds a randomly "
        "initialised model, seeded by `seed`",
    )
    checkpoint: str | None = Field(
        None, description="A state_dict file (.pt) to load, relative to the hypothesis file"
    )
    seed: int = Field(0, description="Seed for random initialisation (hf_config, factories)")
    adapter: str | dict[str, Any] | None = Field(
        None,
        description="Force an architecture adapter by name (gpt2, gpt_neox, llama, ...), or a "
        "declarative adapter for a custom model: a .yaml file (relative to the hypothesis) or "
        "the same mapping inline (dims, sites: site kind -> module path)",
    )
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda:0', ...")
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="hf models only: 'auto' (accelerate shards the model across this worker's "
        "GPUs) or an explicit map module -> device, passed to from_pretrained; replaces device",
    )
    check_sites: bool = Field(
        True,
        description="At load, check each used site fires once per forward and that patching a "
        "site with its own value leaves the logits unchanged",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        given = [k for k in ("factory", "hf", "hf_config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "expected exactly one of factory, hf, hf_config, found "
                + (", ".join(given) if given else "none")
            )
        if self.hf_config is not None and "model_type" not in self.hf_config:
            raise ValueError("hf_config needs a model_type (e.g. gpt2, gpt_neox, llama)")
        return self


class PosRange(Section):
    """Positions ``start <= p < stop``; negative values count from each row's end (-1 = last)."""

    start: int
    stop: int | None = None


class PosColumn(Section):
    """Per-row positions read from a dataset column (an int or a list of ints per row)."""

    column: str
    counterfactual: str | None = Field(
        None,
        description="Column with this role's position(s) in each counterfactual row, for a "
        "counterfactual whose length differs from its base row",
    )


PositionSpec = Annotated[int | PosRange | PosColumn, Field(union_mode="left_to_right")]


class DataSection(Section):
    """The dataset: exactly one of ``generator`` or ``path``."""

    generator: Ref | None = Field(None, description=f"{REF_HELP} returning a list of row dicts")
    params: dict[str, Any] = Field(default_factory=dict, description="Arguments for the generator")
    path: str | None = Field(
        None,
        description="A .jsonl, .csv or .parquet file, or a Hugging Face datasets folder "
        "(save_to_disk), relative to the hypothesis",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping: name used in this file -> column in the data "
        "(e.g. {text: prompt, cf_text: corrupted})",
    )
    tokens: str = Field("tokens", description="Column holding token ids (a list of ints per row)")
    text: str | None = Field(
        None,
        description="Column holding text to tokenize instead (needs a tokenizer); "
        "counterfactual columns may then hold text too",
    )
    tokenizer: str | None = Field(
        None,
        description="Local tokenizer directory, or a 'pkg.mod:fn' returning a tokenizer; "
        "default: the model's hf directory",
    )
    add_special_tokens: bool = Field(
        True, description="Passed to the tokenizer (adds its BOS/EOS where it defines them)"
    )
    prepend_bos: bool = Field(
        False, description="Start every text row with the tokenizer's BOS token (once)"
    )
    padding_side: Literal["right", "left"] = Field(
        "right",
        description="Pad rows of different lengths on the right or the left (attention mask "
        "and position_ids follow); results do not depend on it",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows")
    positions: dict[str, PositionSpec] = Field(
        default_factory=dict,
        description="Named positions: an int (negative from the end), {start, stop}, or "
        "{column}. 'last' (-1) and 'all' are always defined",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.generator is None) == (self.path is None):
            raise ValueError("expected exactly one of generator or path")
        name = (self.path or "").rsplit("/", 1)[-1]
        if "." in name and not name.endswith((".jsonl", ".csv", ".parquet")):
            raise ValueError(
                f"expected a .jsonl, .csv or .parquet file or a datasets folder, found {self.path!r}"
            )
        return self


NUMERIC_METRICS = ("mse", "mae")  # metrics of a model whose output is a number, not logits


class MetricSection(Section):
    """How a forward pass is scored, per example.

    ``loss``: next-token cross-entropy at positions ``at`` (the logits at p predict token p+1, or
    the ``target`` column). ``logit_diff``: logit of ``target`` minus logit of ``wrong``.
    ``prob``/``accuracy``: probability / argmax-correctness of the target. ``kl``: KL(clean ‖
    intervened) of the next-token distributions. ``mse``/``mae``: squared / absolute error of a
    model whose output is one number per position (a regression head or a 1-d readout, [B, T] or
    [B, T, 1]) against the numeric ``target`` column.
    """

    kind: Literal["loss", "logit_diff", "kl", "accuracy", "prob", "mse", "mae"] = "loss"
    at: str | int = Field(
        "last", description="A named position (data.positions, 'last' or 'all') or an int"
    )
    target: str | None = Field(
        None,
        description="Column with the target token id per row (a number for mse/mae); "
        "default: the next token",
    )
    wrong: str | None = Field(None, description="Column with the wrong token id (logit_diff)")

    @model_validator(mode="after")
    def _needs(self) -> MetricSection:
        if self.kind == "logit_diff" and (self.target is None or self.wrong is None):
            raise ValueError("logit_diff needs both `target` and `wrong` columns")
        if self.numeric and self.target is None:
            raise ValueError(f"{self.kind} needs a `target` column holding a number per row")
        return self

    @property
    def numeric(self) -> bool:
        """The model's output is a number (mse/mae), not next-token logits."""
        return self.kind in NUMERIC_METRICS

    @property
    def higher_is_better(self) -> bool:
        return self.kind in ("logit_diff", "accuracy", "prob")


class RunArtifact(Section):
    """An artifact of an earlier MLflow run (downloaded through the tracking URI in effect)."""

    run: str = Field(description="The MLflow run id")
    artifact: str = Field(
        description="The artifact's path in the run, e.g. rotation_L0.resid_post.pt"
    )


class SubspaceSection(Section):
    """A subspace of a site's activation, named for use as ``site[name]``: exactly one of
    ``basis``, ``rotation`` or ``sae``. Experiments then read and write only its coordinates."""

    basis: str | None = Field(
        None,
        description="A direction or basis file (.pt, .npy, .safetensors) holding d x k "
        "(orthonormalised with a warning if it is not), relative to the hypothesis",
    )
    rotation: str | RunArtifact | None = Field(
        None,
        description="A DAS rotation mi_spec wrote (rotation_<config>.pt): a path, or "
        "{run: <MLflow run id>, artifact: <name>}; the subspace is `variable`'s block of columns",
    )
    variable: str | None = Field(
        None, description="rotation: whose block of columns (optional with one variable)"
    )
    sae: str | None = Field(
        None,
        description="A sparse autoencoder folder in the SAELens layout (cfg.json + "
        "sae_weights.safetensors); the coordinates are feature activations and the SAE's "
        "reconstruction error is kept, so an unpatched run is the model's own",
    )
    features: list[int] | None = Field(
        None,
        description="Which coordinates to keep: SAE feature indices, or basis/rotation columns "
        "(default: all)",
    )
    site: str | None = Field(
        None,
        description="The site it lives at (default: the SAE's hook point, the rotation's site); "
        "used to expand `site[name:*]` into one site per coordinate",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SubspaceSection:
        given = [k for k in ("basis", "rotation", "sae") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "expected exactly one of basis, rotation, sae, found "
                + (", ".join(given) or "none")
            )
        if self.variable is not None and self.rotation is None:
            raise ValueError("`variable` picks a block of a DAS rotation; it needs `rotation`")
        if self.features is not None and (
            not self.features or len(set(self.features)) != len(self.features)
        ):
            raise ValueError("`features` must list distinct indices (at least one)")
        return self

    @property
    def source(self) -> str:
        return "basis" if self.basis else "rotation" if self.rotation else "sae"


class Variable(Section):
    """A high-level variable: a dataset column, a safe expression, or a Python callable."""

    column: str | None = None
    value: str | None = Field(
        None, description="A safe expression over tokens, columns, `pos` and other variables"
    )
    fn: Ref | None = Field(
        None, description=f"{REF_HELP} called as fn(row, values[, pos]) -> value"
    )
    parents: list[str] = Field(
        default_factory=list, description="For fn: the variables it reads (the graph's edges)"
    )
    per_position: bool = Field(
        False, description="One value per token position (the expression may use `pos`)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> Variable:
        given = [k for k in ("column", "value", "fn") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "expected exactly one of column, value, fn, found " + (", ".join(given) or "none")
            )
        if self.parents and self.fn is None:
            raise ValueError(
                f"`parents` is only for `fn:` variables; a {given[0]} variable's dependencies are "
                + ("read from its expression" if given[0] == "value" else "its column")
            )
        return self
