"""Adapters on an un-wrapped model: what transformers' ``model.add_adapter(...)`` family does with 🤗 PEFT.

transformers' ``PeftAdapterMixin`` methods need the ``peft`` package and ``isinstance`` checks against its classes, so
they cannot drive peftkit's layers. These functions take the model as first argument and do the same thing with
peftkit's injection and serialization::

    from peftkit import LoraConfig
    from peftkit.transformers_adapters import add_adapter, set_adapter, disable_adapters, enable_adapters

    add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name="adapter_1")
    set_adapter(model, "adapter_1")

The model keeps its class (``LlamaForCausalLM`` stays ``LlamaForCausalLM``); its targeted layers become adapter
layers, ``model.peft_config`` is ``{adapter_name: config}`` and ``model._hf_peft_config_loaded`` is True. On the first
``add_adapter``/``load_adapter`` the functions are also bound to the model under transformers' method names
(``model.set_adapter("b")``, ``model.active_adapters()``, ``model.get_adapter_state_dict()``, ...), so code written
against transformers' methods keeps working after the first call and transformers' own ``model.save_pretrained(dir)``
writes adapter-only files (``adapter_config.json`` + ``adapter_model.safetensors``) without ``peft`` installed.

What matches transformers + the reference: ``add_adapter`` and ``load_adapter`` activate the new adapter (a new
adapter from ``add_adapter`` trains; a loaded one is frozen and puts the model in eval mode unless
``is_trainable=True``); ``disable_adapters`` makes the model compute the base outputs and freezes the adapters,
``enable_adapters`` undoes that; deleting the last adapter removes ``peft_config``. Differences (peftkit's rules):
the user's config is never modified, and ``set_adapter`` keeps each adapter's own trainability (pass
``inference_mode=False`` to make the activated adapters trainable, as the reference does).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..config import PeftConfig
from ..errors import AdapterExistsError, AdapterNotFoundError, ConfigError, PeftWarning
from ..fileio import HUB_KWARGS
from ..model_surface import WeakMethod
from ..peft_model import _config_for_model
from ..registry import get_method
from ..serialization.files import read_adapter, save_adapter_files
from ..serialization.state_dict import WRAPPER_PREFIX, get_peft_model_state_dict, set_peft_model_state_dict
from ..tuner import TunerModel, find_adapter_layers, tuner_class

#: ``{adapter_name: trainable}``, kept in ``model.__dict__`` (the rest of the state is in the layers)
STATE_ATTR = "_peftkit_trainable"
#: the flag transformers reads to treat a model as one with adapters (Trainer checks, adapter-only save_pretrained)
HF_FLAG = "_hf_peft_config_loaded"

__all__ = [
    "active_adapters",
    "add_adapter",
    "bind_adapter_methods",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "get_adapter_state_dict",
    "load_adapter",
    "save_adapter",
    "set_adapter",
]


# ---------------------------------------------------------------------------------------------------- the tuner
def _configs(model: nn.Module) -> dict[str, PeftConfig] | None:
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, dict) and configs else None


def _view(model: nn.Module, configs: dict[str, PeftConfig], peft_type: object) -> TunerModel:
    """A tuner over the adapters already in ``model`` (nothing is injected).

    The model itself holds all state, so it pickles and deep-copies as a plain model: ``peft_config``, the layers'
    active adapters, and ``{adapter: trainable}`` in ``model.__dict__[STATE_ATTR]``. Adapters injected earlier with
    ``inject_adapter_in_model`` are picked up the same way (trainable unless their config says ``inference_mode``).
    """
    tuner = tuner_class(peft_type)(model, {})
    tuner.peft_config = configs
    model.peft_config = configs
    tuner.prefix = get_method(str(peft_type)).prefix
    tuner.targeted_module_names = sorted(name for name, _ in find_adapter_layers(model))
    trainable = model.__dict__.setdefault(STATE_ATTR, {})
    for name, config in configs.items():
        trainable.setdefault(name, not config.inference_mode)
    tuner._trainable = trainable
    modules = [module for _, module in tuner.adapter_modules()]
    active = modules[0].active_adapters if modules else []
    tuner._active = [a for a in active if a in configs] or list(configs)[:1]
    return tuner


def _tuner(model: nn.Module) -> TunerModel:
    """The tuner managing ``model``'s adapters; raises :class:`ConfigError` when the model holds none."""
    configs = _configs(model)
    if configs is None:
        raise ConfigError("model", type(model).__name__,
                          "No adapter loaded: it holds no adapters; call add_adapter() or load_adapter() first")
    return _view(model, configs, next(iter(configs.values())).peft_type)


def _inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> tuple[TunerModel, Any, bool]:
    """Add adapter ``adapter_name`` to ``model``; returns ``(tuner, applied plan, first_adapter)``."""
    if config.is_prompt_learning:
        raise ConfigError("peft_type", str(config.peft_type), "prompt-learning methods need a PeftModel "
                          "(get_peft_model); allowed here: methods that inject layers (LoRA, IA3, LoHa, ...)")
    configs = _configs(model)
    first = configs is None
    tuner = _view(model, {} if first else configs, config.peft_type)  # type: ignore[arg-type]
    try:
        applied = tuner.inject_adapter(config, adapter_name)
    except BaseException:
        if first:
            _forget(model)
        raise
    return tuner, applied, first


def _forget(model: nn.Module) -> None:
    """Drop the adapter bookkeeping from ``model`` (after its last adapter is gone)."""
    for attr in (STATE_ATTR, "peft_config"):
        model.__dict__.pop(attr, None)
    if getattr(model, HF_FLAG, None) is not None:
        setattr(model, HF_FLAG, False)


def _mark_loaded(model: nn.Module) -> None:
    setattr(model, HF_FLAG, True)
    bind_adapter_methods(model)


# ---------------------------------------------------------------------------------------------------- adding
def add_adapter(model: nn.Module, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
    """Add a fresh adapter built from ``adapter_config`` to ``model`` (in place) and activate it for training.

    Like transformers' ``model.add_adapter``: the new adapter is active and trainable (whatever
    ``adapter_config.inference_mode`` says), the other adapters are frozen, base weights are frozen.
    ``base_model_name_or_path`` is recorded from ``model.name_or_path`` in peftkit's copy of the config.

    Raises:
        TypeError: ``adapter_config`` is not a ``PeftConfig`` (as transformers does).
        AdapterExistsError: ``adapter_name`` is taken. The model is unchanged when anything raises.
    """
    if not isinstance(adapter_config, PeftConfig):
        raise TypeError(f"adapter_config should be an instance of PeftConfig (e.g. peftkit.LoraConfig). "
                        f"Got {type(adapter_config)} instead.")
    adapter_name = adapter_name or "default"
    _check_free(model, adapter_name)
    config = _config_for_model(model, adapter_config, warn=False).copy(inference_mode=False)
    tuner, _, _ = _inject(model, config, adapter_name)
    tuner.set_adapter(adapter_name)
    _mark_loaded(model)


def load_adapter(
    model: nn.Module,
    peft_model_id: str | os.PathLike[str] | None = None,
    adapter_name: str | None = None,
    peft_config: PeftConfig | dict[str, Any] | None = None,
    adapter_state_dict: dict[str, torch.Tensor] | None = None,
    is_trainable: bool = False,
    low_cpu_mem_usage: bool = False,
    key_mapping: dict[str, str] | None = None,
    adapter_kwargs: dict[str, Any] | None = None,
    hotswap: bool | str = "auto",
    **kwargs: Any,
) -> _IncompatibleKeys:
    """Load a saved adapter (a directory or Hub id written by ``save_pretrained`` of either library) into ``model``
    under ``adapter_name`` (default ``"default"``) and activate it.

    Instead of a path, ``peft_config`` (a config or its dict) plus ``adapter_state_dict`` may be given. The adapter
    is frozen and the model put in eval mode unless ``is_trainable``. Hub arguments (``revision``, ``subfolder``,
    ``token``, ``cache_dir``, ...) go in ``kwargs`` or ``adapter_kwargs``.

    Returns ``(missing_keys, unexpected_keys)``. Raises (leaving the model unchanged) for a taken name, missing or
    corrupt files, shape mismatches, or a checkpoint that matches no module. ``hotswap=True`` is not supported here
    (use ``peftkit.hotswap_adapter`` on a ``PeftModel``); other transformers loading options are ignored with a
    warning.
    """
    if hotswap is True:
        raise ConfigError("hotswap", hotswap, "allowed: 'auto' or False; to replace an adapter's weights in place "
                          "use peftkit.hotswap_adapter on a PeftModel")
    adapter_name = adapter_name or "default"
    _check_free(model, adapter_name)
    options = {**kwargs, **(adapter_kwargs or {})}
    hub = {k: v for k, v in options.items() if k in ("subfolder", *HUB_KWARGS)}
    ignored = sorted(set(options) - set(hub))
    if ignored:
        warnings.warn(f"load_adapter ignores these transformers loading options: {ignored}", PeftWarning,
                      stacklevel=2)
    if peft_model_id is None and (peft_config is None or adapter_state_dict is None):
        raise ConfigError("peft_model_id", None, "pass a path or Hub id, or both peft_config and adapter_state_dict")
    given = _given_config(peft_config)
    if adapter_state_dict is None:  # config (unless given) and weights read together, their pairing checked
        config, weights = read_adapter(peft_model_id, given, **hub)  # type: ignore[arg-type]
    else:
        config, weights = given or PeftConfig.from_pretrained(peft_model_id, **hub), adapter_state_dict
    config = config.copy(inference_mode=not is_trainable)
    tuner, applied, new = _inject(model, config, adapter_name)
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                           key_mapping=key_mapping)
    except BaseException:
        tuner.remove_injected(applied)
        if new:
            _forget(model)
        raise
    tuner.set_adapter(adapter_name)
    _mark_loaded(model)
    if not is_trainable:
        model.eval()
    _warn_incompatible(result)
    return result


def _given_config(peft_config: PeftConfig | dict[str, Any] | None) -> PeftConfig | None:
    """The config passed to ``load_adapter`` (a config or its dict), or None when it is to be read from files."""
    if isinstance(peft_config, PeftConfig):
        return peft_config
    if isinstance(peft_config, dict):
        return PeftConfig.from_dict(peft_config)
    if peft_config is not None:
        raise ConfigError("peft_config", type(peft_config).__name__, "allowed: a PeftConfig, its dict, or None")
    return None


def _check_free(model: nn.Module, adapter_name: str) -> None:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name in configs:
        raise AdapterExistsError(f"Adapter with name {adapter_name!r} already exists. Please use a different name.")


def _warn_incompatible(result: _IncompatibleKeys) -> None:
    if result.missing_keys:
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {result.missing_keys}",
                      PeftWarning, stacklevel=3)
    if result.unexpected_keys:
        warnings.warn(f"The checkpoint holds keys that belong to no adapter of this model (ignored): "
                      f"{result.unexpected_keys}", PeftWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------- switching
def set_adapter(model: nn.Module, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
    """Make ``adapter_name`` (a name or a list, whose updates add up) the active adapter(s).

    Each adapter keeps its own trainability unless ``inference_mode`` is given (``False``: the activated adapters
    train, as the reference does; ``True``: they are frozen). Raises :class:`AdapterNotFoundError` for unknown names.
    """
    _tuner(model).set_adapter(adapter_name, inference_mode=inference_mode)


def disable_adapters(model: nn.Module) -> None:
    """Make the model compute its base outputs (every adapter layer bypassed; adapter parameters frozen)."""
    _tuner(model).disable_adapter_layers()


def enable_adapters(model: nn.Module) -> None:
    """Undo :func:`disable_adapters`: the active adapters act again (and train again if they were trainable)."""
    _tuner(model).enable_adapter_layers()


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (also while adapters are disabled, as transformers reports them)."""
    return _tuner(model).active_adapters


def delete_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Remove adapter(s) from the model. If an active adapter goes, the first remaining one (sorted) becomes active;
    after the last one ``model.peft_config`` is removed and ``model._hf_peft_config_loaded`` is False.

    Raises :class:`AdapterNotFoundError` (nothing deleted) when a name is unknown.
    """
    tuner = _tuner(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in tuner.peft_config]
    if missing:
        raise AdapterNotFoundError(missing[0] if len(missing) == 1 else missing, tuner.peft_config)
    for name in names:
        tuner.delete_adapter(name)
    if not tuner.peft_config:
        _forget(model)


# ---------------------------------------------------------------------------------------------------- saving
def get_adapter_state_dict(
    model: nn.Module, adapter_name: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` (default: the first active adapter) with checkpoint keys relative to the
    model and without the adapter name: ``model.layers.0.self_attn.q_proj.lora_A.weight``.

    ``state_dict`` (the model's own ``state_dict()``, e.g. gathered by a trainer) supplies the values when given.
    """
    tuner = _tuner(model)
    name = adapter_name if adapter_name is not None else tuner.active_adapters[0]
    return get_peft_model_state_dict(model, state_dict, name, save_embedding_layers=False)


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    adapter_name: str | None = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    save_embedding_layers: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (``.bin`` without ``safe_serialization``)
    of one adapter into ``save_directory``, as ``PeftModel.save_pretrained`` writes its ``default`` adapter: keys
    ``base_model.model.<path>.lora_A.weight``, so ``PeftModel.from_pretrained`` (either library) and
    :func:`load_adapter` read them.

    ``adapter_name`` defaults to the active adapter; several active adapters raise :class:`ConfigError` (name one).
    ``save_embedding_layers=True`` also stores the full embedding matrices (after resizing the vocabulary).
    Only the main process writes (``is_main_process``); files are written atomically.
    """
    tuner = _tuner(model)
    if adapter_name is None:
        if len(tuner.active_adapters) != 1:
            raise ConfigError("adapter_name", None, f"several adapters are active ({tuner.active_adapters}); "
                              "allowed: the name of the one to save")
        adapter_name = tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise AdapterNotFoundError(adapter_name, tuner.peft_config)
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ConfigError("save_directory", save_directory, "allowed: a directory path, not a file")
    if not is_main_process:
        return
    tensors = get_peft_model_state_dict(model, state_dict, adapter_name, save_embedding_layers=save_embedding_layers)
    tensors = {WRAPPER_PREFIX + k: v for k, v in tensors.items()}
    save_adapter_files(save_directory, tuner.peft_config[adapter_name], tensors, safe_serialization)


# ---------------------------------------------------------------------------------------------------- binding
_BOUND = {
    "add_adapter": add_adapter,
    "load_adapter": load_adapter,
    "set_adapter": set_adapter,
    "enable_adapters": enable_adapters,
    "disable_adapters": disable_adapters,
    "active_adapters": active_adapters,
    "delete_adapter": delete_adapter,
    "get_adapter_state_dict": get_adapter_state_dict,
}


def bind_adapter_methods(model: nn.Module) -> nn.Module:
    """Bind this module's functions to ``model`` under transformers' method names and return it.

    Afterwards ``model.add_adapter(config, adapter_name="b")``, ``model.set_adapter("b")``,
    ``model.disable_adapters()``, ``model.active_adapters()``, ``model.get_adapter_state_dict()``, ... run peftkit's
    code for this model instance only (the class is untouched), and transformers' ``model.save_pretrained(dir)``
    writes the active adapter in the adapter file format. Called by :func:`add_adapter` / :func:`load_adapter`.
    """
    for name, function in _BOUND.items():
        object.__setattr__(model, name, WeakMethod(function, model))
    return model
