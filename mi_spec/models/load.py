"""Load a model from a model section: a Python factory, a local HF directory, or an HF config.

Returns the module in eval mode on its device plus a weights hash that identifies it in Plans,
caches and MLflow: derived from the checkpoint files when there are any (``models/identity.py``),
from the tensors only for models built in memory. Never touches a model hub: HF loading is
``local_files_only``; single-file and sharded (``*.safetensors.index.json``) checkpoints both load.
``dtype`` casts the whole model; ``device_map`` (``hf:`` only) lets accelerate place or shard it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mi_spec.data.dataset import resolve_path
from mi_spec.errors import ResolveError
from mi_spec.models.identity import (
    checkpoint_files,
    files_identity,
    hf_weight_files,
    safetensors_header,
    tensor_identity,
)
from mi_spec.sites.adapter import Adapter
from mi_spec.sites.declarative import pick_adapter
from mi_spec.spec.refs import call_ref, import_ref
from mi_spec.spec.sections import ModelSection

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,  # exact models, finite-difference checks
}


@dataclass
class LoadedModel:
    """A loaded model. ``module`` is the module; a driver that resolved an ``hf:`` model with
    ``lazy=True`` holds only its structure (``skeleton``, on the meta device: names, shapes,
    config) and loads the weights on the first access to ``module``, so a driver that only
    plans, or hands the work to workers, never reads a checkpoint's tensors."""

    skeleton: torch.nn.Module  # the module itself once loaded
    adapter: Adapter
    weights_hash: str
    device: torch.device
    hf_dir: str | None = None  # local directory, for its tokenizer
    n_ctx: int | None = None  # longest input the model accepts (absolute position embeddings)
    n_input_ids: int | None = None  # rows of its input embedding: token ids must be below this
    materialize: Callable[[], LoadedModel] | None = field(default=None, repr=False)

    @property
    def module(self) -> torch.nn.Module:
        """The module with its weights (loaded now if this was a lazy, structure-only model)."""
        if self.materialize is not None:
            real = self.materialize()
            self.skeleton, self.device, self.materialize = real.skeleton, real.device, None
        return self.skeleton

    @property
    def loaded(self) -> bool:
        return self.materialize is None


def no_kv_cache(module: torch.nn.Module) -> None:
    """Turn off a Hugging Face model's KV cache: every pass here is one full forward, and the
    cache it would build (keys and values of every layer) is never read."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False


def pick_device(name: str) -> torch.device:
    """``auto`` (cuda when available), or a device name checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ResolveError(
            f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps", ("device",)
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ResolveError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{torch.cuda.device_count()} GPUs visible); use device: auto or cpu",
                ("device",),
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ResolveError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} GPUs "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})",
                ("device",),
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ResolveError(f"device {name!r}: MPS is not available here", ("device",))
    return device


def load_model(section: ModelSection, base_dir: Path, lazy: bool = False) -> LoadedModel:
    """Build the module, load the checkpoint, move to device/dtype, pick the adapter.

    ``lazy``: for an ``hf:`` folder, build only its structure on the meta device now (identity
    from the files, adapter, sizes) and load the weights when ``module`` is first used."""
    dtype = _DTYPES[section.dtype]
    hf_dir = None
    files: list[Path] = []  # the files the weights come from (their digests identify the model)
    device_map = getattr(section, "device_map", None)
    if device_map is not None and section.hf is None:
        raise ResolveError(
            "device_map places a checkpoint's weights as they load, so it needs model.hf "
            f"(a local Hugging Face folder); this model comes from "
            f"{'model.factory' if section.factory else 'model.hf_config'}: use model.device",
            ("device_map",),
        )
    if lazy and section.hf is not None and (lazy_model := _lazy(section, base_dir)) is not None:
        return lazy_model
    if section.factory is not None:
        module = _from_factory(section, base_dir)
    elif section.hf is not None:
        hf_dir = str(resolve_path(section.hf, base_dir, "hf"))
        module = _from_hf_dir(hf_dir, dtype, device_map)
        files = hf_weight_files(Path(hf_dir))
    else:
        module = _from_hf_config(section.hf_config or {}, section.seed)
    if not isinstance(module, torch.nn.Module):
        raise ResolveError(
            f"model.factory {section.factory} returned {type(module).__name__}, "
            "expected a torch.nn.Module"
        )
    if section.checkpoint is not None:
        path = resolve_path(section.checkpoint, base_dir, "checkpoint")
        _load_checkpoint(module, path)
        files += checkpoint_files(path)
    identity = files_identity(files) if files else tensor_identity(module)
    if device_map is None:
        module = module.to(device=pick_device(section.device), dtype=dtype)
    else:
        module = module.to(dtype=dtype)  # accelerate placed it; a move would undo the map
    module = module.eval()
    no_kv_cache(module)
    for p in module.parameters():
        p.requires_grad_(False)
    adapter = _adapter(module, section, base_dir)
    return LoadedModel(
        module,
        adapter,
        identity,
        input_device(module),
        hf_dir,
        context_length(module),
        input_ids_limit(module, adapter),
    )


def _adapter(module: torch.nn.Module, section: ModelSection, base_dir: Path) -> Adapter:
    adapter = pick_adapter(module, section.adapter, base_dir)  # on workers too
    try:
        adapter.dims(module)
    except Exception as e:  # a built-in adapter forced onto a model of another family
        raise ResolveError(
            f"the {adapter.name} adapter does not fit this {type(module).__name__} "
            f"({type(e).__name__}: {_first_line(e)}); leave model.adapter out to pick the "
            "adapter from the model's class, or describe the model with a YAML adapter",
            ("adapter",),
        ) from None
    return adapter


def _lazy(section: ModelSection, base_dir: Path) -> LoadedModel | None:
    """An ``hf:`` model's structure on the meta device, its identity from the files, and a
    loader for the weights; None when the structure cannot be built without loading (the
    eager path then loads it, or says what is wrong)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = resolve_path(section.hf or "", base_dir, "hf")
    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    files = hf_weight_files(hf_dir)
    weights = [f for f in files if f.suffix in (".safetensors", ".bin")]
    try:  # cheap checks that the weights are there and whole; otherwise load now and say why
        for f in weights:
            if f.suffix == ".safetensors":
                safetensors_header(f)
    except (OSError, ValueError):
        return None
    if not weights:
        return None
    if section.checkpoint is not None:
        files += checkpoint_files(resolve_path(section.checkpoint, base_dir, "checkpoint"))
    adapter = _adapter(skeleton.eval(), section, base_dir)
    device_map = section.device_map
    device = pick_device(section.device if device_map is None else "auto")
    return LoadedModel(
        skeleton,
        adapter,
        files_identity(files),
        device,
        str(hf_dir),
        context_length(skeleton),
        input_ids_limit(skeleton, adapter),
        materialize=lambda: load_model(section, base_dir),
    )


def _input_embedding(module: torch.nn.Module) -> torch.nn.Module | None:
    """``get_input_embeddings()`` where the model has one (HF's base class raises
    NotImplementedError when a subclass does not define it), else None."""
    if not hasattr(module, "get_input_embeddings"):
        return None
    try:
        return module.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def input_device(module: torch.nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device (the first shard under a device_map)."""
    embedding = _input_embedding(module)
    first = next(embedding.parameters(), None) if embedding is not None else None
    first = first if first is not None else next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def context_length(module: torch.nn.Module) -> int | None:
    """The hard input-length limit of a model with learned absolute position embeddings
    (``n_ctx`` / ``n_positions`` in its config), or None. Rotary models have no hard limit."""
    config = getattr(module, "config", None) or getattr(module, "cfg", None)
    for name in ("n_ctx", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def input_ids_limit(module: torch.nn.Module, adapter: Adapter) -> int | None:
    """The number of rows of the model's input embedding (``get_input_embeddings``, else the
    adapter's ``embed`` site when it is an ``nn.Embedding``), or None when it has none."""
    embedding = _input_embedding(module)
    hook = adapter.table.get("embed")
    if embedding is None and hook is not None and hook.io == "output":
        embedding = dict(module.named_modules()).get(hook.module)
    return embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None


def _from_factory(section: ModelSection, base_dir: Path) -> Any:
    ref = section.factory or ""
    try:
        fn = import_ref(ref, search=[base_dir])
    except ResolveError as e:
        raise ResolveError(str(e), ("factory",)) from None
    torch.manual_seed(section.seed)
    return call_ref(fn, ref, "model.factory", section.kwargs, ("factory",), ("kwargs",))


def _from_hf_dir(
    directory: str, dtype: torch.dtype, device_map: str | dict[str, Any] | None
) -> torch.nn.Module:
    """``from_pretrained`` offline, straight into ``dtype`` (a bf16 checkpoint never passes
    through fp32), with ``device_map`` handed to accelerate when given."""
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers 5 names it dtype; 4.x torch_dtype
    kwargs: dict[str, Any] = {
        "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype
    }
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ResolveError(
                "model.device_map needs the accelerate package: pip install 'mi_spec[gpu]' (or accelerate)",
                ("device_map",),
            ) from None
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many kinds for a broken folder
        where = ("device_map",) if device_map is not None and "device" in str(e) else ("hf",)
        raise ResolveError(
            f"model.hf: cannot load a model from {directory}: {type(e).__name__}: {_first_line(e)}",
            where,
        ) from None


def _from_hf_config(config: dict[str, Any], seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(config)
    model_type = params.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **params)
    except (ValueError, KeyError) as e:
        raise ResolveError(f"model.hf_config: {e}", ("hf_config",)) from None
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(cfg)
    except Exception as e:
        raise ResolveError(
            f"model.hf_config: cannot build a {model_type} model: {type(e).__name__}: "
            f"{_first_line(e)}",
            ("hf_config",),
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _load_checkpoint(module: torch.nn.Module, path: Path) -> None:
    """A state_dict from a ``.pt`` file (optionally under a "state_dict" key), a ``.safetensors``
    file, or a sharded safetensors checkpoint given by its ``*.safetensors.index.json``."""
    if path.is_dir():
        raise ResolveError(
            f"model.checkpoint {path} is a directory; expected a state_dict file "
            "(.pt or .safetensors); a Hugging Face folder goes in model.hf",
            ("checkpoint",),
        )
    try:
        if path.name.endswith(".index.json"):
            state: Any = _load_shards(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which
        raise ResolveError(
            f"model.checkpoint {path}: cannot read it ({type(e).__name__}: {_first_line(e)})",
            ("checkpoint",),
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        found = type(state).__name__
        if isinstance(state, dict):
            found = "a mapping whose values are not all tensors"
        raise ResolveError(
            f"model.checkpoint {path} holds {found}, expected a state_dict (a mapping of "
            "parameter names to tensors, e.g. torch.save(model.state_dict(), path))",
            ("checkpoint",),
        )
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ResolveError(
            f"model.checkpoint {path} does not fit the model: {e}", ("checkpoint",)
        ) from None


def _load_shards(index: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint (the shards its weight map names)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in checkpoint_files(index)[1:]:
        state.update(load_file(str(shard), device="cpu"))
    return state


def weights_hash(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer (names, dtypes, shapes, values)."""
    return tensor_identity(module)
