"""Load a model from a model section: a Python factory, a local HF directory, or an HF config.

Returns the module in eval mode on its device plus a weights hash that identifies it in Plans,
caches and MLflow. Never touches a model hub: HF loading is ``local_files_only``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mi_spec.data.dataset import resolve_path
from mi_spec.errors import ResolveError
from mi_spec.sites.adapter import Adapter
from mi_spec.sites.declarative import pick_adapter
from mi_spec.spec.refs import call_ref, import_ref
from mi_spec.spec.sections import ModelSection

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    module: torch.nn.Module
    adapter: Adapter
    weights_hash: str
    device: torch.device
    hf_dir: str | None = None  # local directory, for its tokenizer
    n_ctx: int | None = None  # longest input the model accepts (absolute position embeddings)
    n_input_ids: int | None = None  # rows of its input embedding: token ids must be below this


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


def load_model(section: ModelSection, base_dir: Path) -> LoadedModel:
    """Build the module, load the checkpoint, move to device/dtype, pick the adapter."""
    hf_dir = None
    if section.factory is not None:
        module = _from_factory(section, base_dir)
    elif section.hf is not None:
        hf_dir = str(resolve_path(section.hf, base_dir, "hf"))
        module = _from_hf_dir(hf_dir)
    else:
        module = _from_hf_config(section.hf_config or {}, section.seed)
    if not isinstance(module, torch.nn.Module):
        raise ResolveError(
            f"model.factory {section.factory} returned {type(module).__name__}, "
            "expected a torch.nn.Module"
        )
    if section.checkpoint is not None:
        _load_checkpoint(module, resolve_path(section.checkpoint, base_dir, "checkpoint"))
    device = pick_device(section.device)
    module = module.to(device=device, dtype=_DTYPES[section.dtype]).eval()
    for p in module.parameters():
        p.requires_grad_(False)
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
    return LoadedModel(
        module,
        adapter,
        weights_hash(module),
        device,
        hf_dir,
        context_length(module),
        input_ids_limit(module, adapter),
    )


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
    embedding = None
    if hasattr(module, "get_input_embeddings"):
        try:
            embedding = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            embedding = None
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


def _from_hf_dir(directory: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a broken folder
        raise ResolveError(
            f"model.hf: cannot load a model from {directory}: {type(e).__name__}: {_first_line(e)}",
            ("hf",),
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
    """A state_dict from a ``.pt`` file (optionally under a "state_dict" key) or ``.safetensors``."""
    if path.is_dir():
        raise ResolveError(
            f"model.checkpoint {path} is a directory; expected a state_dict file "
            "(.pt or .safetensors); a Hugging Face folder goes in model.hf",
            ("checkpoint",),
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
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


def weights_hash(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
