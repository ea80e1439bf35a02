"""Hot-swapping a loaded LoRA adapter: replace its weights in place, so a compiled model keeps its graphs.

``hotswap_adapter(model, path, "default")`` copies the adapter saved in ``path`` into the tensors of the loaded
adapter ``"default"``: no module or parameter object is created or replaced, only their values change
(``Tensor.copy_``). As in the reference, the new adapter may target a subset of the loaded modules (the LoRA
tensors of the modules it lacks are set to 0, so those modules compute their base output) but no module the loaded
adapter lacks. Its ranks may be equal or smaller (a smaller rank ``r'`` fills rows ``[:r']`` of ``A: (r, in)`` and
columns ``[:r']`` of ``B: (out, r)``, the rest is set to 0, which computes exactly the rank-``r'`` update) or larger:
then the parameter objects keep their identity but take the new shape (``torch.utils.swap_tensors``), which a
compiled model sees as a new graph (it recompiles; :func:`prepare_model_for_compiled_hotswap` with a large enough
``target_rank`` avoids that). Each layer's ``scaling`` becomes the new adapter's ``lora_alpha / r`` (after
``rank_pattern`` / ``alpha_pattern``; ``lora_alpha / sqrt(r)`` with rsLoRA).

For a ``torch.compile``'d model to swap without recompiling, call :func:`prepare_model_for_compiled_hotswap` after
loading the first adapter and before compiling: it turns every scaling into a 0-dim float32 tensor (a float
scaling is baked into the graph as a constant; a tensor is an input whose value :func:`hotswap_adapter` updates
with ``fill_``), and with ``target_rank`` it zero-pads every adapter to that rank so later adapters of any rank up
to it fit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .config import PeftConfig
from .errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    MergeError,
    PeftWarning,
    ShapeMismatchError,
)
from .fileio import HUB_KWARGS
from .injection.match import pattern_value
from .layers.base import AdapterLayer
from .methods.lora.config import LoraConfig
from .methods.lora.layers import LoraLayer, lora_scaling
from .registry import get_method
from .serialization.files import read_adapter
from .serialization.state_dict import WRAPPER_PREFIX, adapter_tensor_map

_COMPILED_PREFIX = "_orig_mod."
CHECK_COMPILED_CHOICES = ("error", "warn", "ignore")


# ---------------------------------------------------------------------------------------------- model helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``model`` itself."""
    inner = model.__dict__.get("_modules", {}).get("_orig_mod")
    return model if inner is None else inner


def is_compiled(model: nn.Module) -> bool:
    """True for ``torch.compile(model)`` (an ``OptimizedModule``) and for ``model.compile()`` (in place)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or "_orig_mod" in model.__dict__.get("_modules", {}):
        return True
    return model.__dict__.get("_compiled_call_impl") is not None


def _configs(model: nn.Module) -> dict[str, PeftConfig]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ConfigError("model", type(model).__name__,
                          "allowed: a PeftModel or a model with injected adapters (it has no peft_config)")
    return configs


def _user_model(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``model.base_model.model``), else ``model``."""
    tuner = model.__dict__.get("_modules", {}).get("base_model")
    inner = getattr(tuner, "model", None) if tuner is not None else None
    return inner if isinstance(inner, nn.Module) and hasattr(tuner, "peft_config") else model


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(path relative to the user's model, layer)`` of every LoRA layer."""
    for path, module in _user_model(model).named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def _set_scaling(layer: LoraLayer, adapter_name: str, scaling: float) -> None:
    """Write ``scaling`` into ``layer.scaling[adapter_name]``: ``fill_`` a tensor (compiled hot-swap), else assign."""
    current = layer.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        with torch.no_grad():
            current.fill_(scaling)
    else:
        layer.scaling[adapter_name] = float(scaling)


def _equivalent_alpha(scaling: float, r: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scaling`` at rank ``r``, so ``lora_scaling(r, alpha, rslora) == scaling``."""
    return scaling * (math.sqrt(r) if use_rslora else r)


# ---------------------------------------------------------------------------------------------- preparation
def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with a loaded LoRA adapter for ``torch.compile`` followed by hot-swaps without recompiling.

    Call it after loading the first adapter and before compiling. It

    * turns every ``layer.scaling[name]`` into a 0-dim float32 tensor on the layer's device (the value is
      unchanged), so a hot-swap to a different ``lora_alpha / r`` only changes a tensor's value;
    * with ``target_rank``, zero-pads every adapter of the model to rank ``target_rank``: ``A: (r, in)`` becomes
      ``(target_rank, in)`` and ``B: (out, r)`` becomes ``(out, target_rank)`` (new parameters, since the shapes
      change; the outputs are unchanged). ``layer.r[name]`` becomes ``target_rank`` and ``layer.lora_alpha[name]``
      the value that keeps the original scaling. ``target_rank`` must be at least the largest rank of the adapters
      that will be swapped in;
    * with ``target_rank``, records ``r = target_rank`` (and in ``rank_pattern``) in the model's own configs
      (``model.peft_config``), since the padded weights are what ``save_pretrained`` then writes. ``config`` is
      accepted for compatibility but never modified (the reference rewrites the configs passed to it).

    ``check_compiled``: what to do when ``model`` is already compiled (too late: swaps will recompile):
    ``"error"`` raises :class:`ConfigError`, ``"warn"`` warns, ``"ignore"`` goes on.
    """
    _check_not_compiled(model, check_compiled)
    layers = list(_lora_layers(_unwrap(model)))
    if not layers:
        raise ConfigError("model", type(model).__name__, "it holds no LoRA layers; load the first adapter, then "
                          "call prepare_model_for_compiled_hotswap, then torch.compile")
    if target_rank is not None:
        _check_target_rank(layers, target_rank)
    for _, layer in layers:
        _scalings_to_tensors(layer)
        if target_rank is not None:
            for name in list(layer.r):
                _pad_adapter(layer, name, target_rank)
    if target_rank is not None:
        _record_padded_rank(model, target_rank, config)


def _record_padded_rank(model: nn.Module, target_rank: int, config: object) -> None:
    """Record the padded rank in the model's own configs (so ``save_pretrained`` writes what the layers hold).

    Unlike the reference, configs the caller passes are never modified: peftkit keeps its own copies.
    """
    stored = getattr(_unwrap(model), "peft_config", None)
    if isinstance(stored, dict):
        for name, cfg in list(stored.items()):
            stored[name] = cfg.copy(r=target_rank, rank_pattern=dict.fromkeys(cfg.rank_pattern or {}, target_rank))
    if config is not None and config is not stored:
        warnings.warn("prepare_model_for_compiled_hotswap does not modify the config you pass (the reference does); "
                      "the model's own configs now record r=target_rank", PeftWarning, stacklevel=3)


def _check_not_compiled(model: nn.Module, check_compiled: str) -> None:
    if check_compiled not in CHECK_COMPILED_CHOICES:
        raise ConfigError("check_compiled", check_compiled, f"allowed: {list(CHECK_COMPILED_CHOICES)}")
    if not is_compiled(model) or check_compiled == "ignore":
        return
    message = ("the model is already compiled; call prepare_model_for_compiled_hotswap before torch.compile, "
               "otherwise hot-swapping recompiles")
    if check_compiled == "error":
        raise ConfigError("check_compiled", check_compiled, message + " (pass check_compiled='warn' or 'ignore' "
                          "to go on anyway)")
    warnings.warn(message, PeftWarning, stacklevel=3)


def _check_target_rank(layers: list[tuple[str, LoraLayer]], target_rank: int) -> None:
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise ConfigError("target_rank", target_rank, "allowed: None or an int >= 1")
    for path, layer in layers:
        for name, r in layer.r.items():
            if r > target_rank:
                raise ConfigError("target_rank", target_rank, f"adapter {name!r} of layer {path!r} has rank {r}; "
                                  "target_rank must be at least the largest rank of every adapter")


def _scalings_to_tensors(layer: LoraLayer) -> None:
    device = layer.get_base_layer().weight.device
    for name, value in list(layer.scaling.items()):
        if not isinstance(value, torch.Tensor):
            layer.scaling[name] = torch.tensor(float(value), dtype=torch.float32, device=device)


def _pad_adapter(layer: LoraLayer, name: str, target_rank: int) -> None:
    """Zero-pad adapter ``name`` of ``layer`` to rank ``target_rank`` (its outputs do not change)."""
    r = layer.r[name]
    if r == target_rank:
        return
    for attr, dim in (("lora_A", 0), ("lora_B", 1), ("lora_embedding_A", 0), ("lora_embedding_B", 1)):
        holder = getattr(layer, attr)
        if name not in holder:
            continue
        item = holder[name]
        if isinstance(item, nn.Module):
            item.weight = _padded(item.weight, dim, target_rank)
            _set_rank_attr(item, dim, target_rank)
        else:
            holder[name] = _padded(item, dim, target_rank)
    scaling = layer.scaling[name]
    value = float(scaling) if isinstance(scaling, torch.Tensor) else scaling
    layer.r[name] = target_rank
    layer.lora_alpha[name] = _equivalent_alpha(value, target_rank, layer.use_rslora.get(name, False))


def _padded(param: nn.Parameter, dim: int, size: int) -> nn.Parameter:
    shape = list(param.shape)
    shape[dim] = size
    data = torch.zeros(shape, dtype=param.dtype, device=param.device)
    data.narrow(dim, 0, param.shape[dim]).copy_(param.detach())
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _set_rank_attr(module: nn.Module, dim: int, size: int) -> None:
    """Keep ``out_features``/``in_features`` (or conv channels) consistent with the padded weight."""
    names = ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels")
    for attr in names:
        if hasattr(module, attr):
            setattr(module, attr, size)


# ---------------------------------------------------------------------------------------------- swapping
@dataclass
class _Entry:
    """One tensor of the loaded adapter: where it lives and, for LoRA factors, which dimension is the rank."""

    key: str  # checkpoint key relative to the user's model
    tensor: torch.Tensor
    layer: LoraLayer | None = None
    layer_path: str = ""
    rank_dim: int | None = None
    attr: str = ""  # the layer's attribute holding it (``lora_A``, ``lora_embedding_B``, ...)


def _entries(model: nn.Module, adapter_name: str) -> tuple[dict[str, _Entry], dict[str, str]]:
    """``({checkpoint key: entry}, {in-memory key: checkpoint key})`` of adapter ``adapter_name``, keys relative
    to the user's model (no ``base_model.model.``)."""
    entries: dict[str, _Entry] = {}
    aliases: dict[str, str] = {}
    for saved, (mem, tensor) in adapter_tensor_map(model, adapter_name).items():
        key = saved.removeprefix(WRAPPER_PREFIX)
        entries[key] = _Entry(key, tensor)
        aliases[mem.removeprefix(WRAPPER_PREFIX)] = key
    for path, layer in _lora_layers(model):
        for saved, (_, tensor) in layer.adapter_state(adapter_name).items():
            key = f"{path}.{saved}" if path else saved
            attr = saved.split(".", 1)[0]
            rank_dim = 0 if attr.endswith("_A") else (1 if tensor.dim() >= 2 else None)
            entries[key] = _Entry(key, tensor, layer, path, rank_dim, attr)
    return entries, aliases


def _normalise(key: str) -> str:
    while key.startswith(_COMPILED_PREFIX):
        key = key[len(_COMPILED_PREFIX):]
    return key.removeprefix(WRAPPER_PREFIX)


def _module_of(key: str, prefix: str) -> str:
    """The module a checkpoint key belongs to: ``a.b.lora_A.weight`` -> ``a.b``."""
    head, sep, _ = key.rpartition("." + prefix)
    return head if sep else key.rsplit(".", 1)[0]


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Copy ``state_dict`` into the loaded adapter ``adapter_name`` of ``model`` in place, and set its scalings.

    ``state_dict`` keys may be checkpoint keys (``lin0.lora_A.weight``, as saved) or in-memory keys
    (``lin0.lora_A.default.weight``), with or without ``base_model.model.`` / ``_orig_mod.``. They must name tensors of
    the loaded adapter; as in the reference, LoRA tensors of the loaded adapter that ``state_dict`` lacks (an
    adapter targeting a subset of the modules) are set to 0, so those modules compute their base output, while a
    lacking ``modules_to_save`` / trainable-token tensor is an error (the reference silently keeps the old copy).
    Rank-bearing factors may have a smaller rank than the loaded ones (zero-padded) or a larger one (the parameter
    keeps its identity and takes the new shape via ``torch.utils.swap_tensors``; a compiled model then recompiles, so
    this warns there); every other dimension must match. ``config`` (the new adapter's ``LoraConfig``) gives each
    layer's scaling ``lora_alpha / r`` after ``rank_pattern`` / ``alpha_pattern`` (rsLoRA: ``/ sqrt(r)``).
    ``model`` may be a ``PeftModel``, a model with injected adapters, or either compiled.

    Everything is checked before anything is written: an unknown adapter (:class:`AdapterNotFoundError`), another
    method (:class:`ConfigError`), a merged adapter (:class:`MergeError`), different targets or keys
    (:class:`HotswapKeyError` naming the modules), another non-rank shape (:class:`ShapeMismatchError`) leave the
    model unchanged. The stored ``model.peft_config[adapter_name]`` takes the new adapter's rank, alpha,
    patterns, rsLoRA flag and dropout.
    """
    inner = _unwrap(model)
    configs = _configs(inner)
    if adapter_name not in configs:
        raise AdapterNotFoundError(adapter_name, configs)
    _check_config(configs[adapter_name], config, parameter_prefix)
    _check_not_merged(inner, adapter_name)
    convert = get_method(str(config.peft_type)).convert_checkpoint  # as a load: e.g. LoRA's tied head keys
    if convert is not None:
        state_dict = convert(inner, state_dict, adapter_name)
    entries, aliases = _entries(inner, adapter_name)
    plan, lacking = _match(entries, aliases, state_dict, adapter_name, parameter_prefix)
    ranks, grown = _check_shapes(plan, config)
    if grown and is_compiled(model):
        _warn_recompile(grown)
    _zero(lacking)
    _write(plan, adapter_name)
    _set_scalings(inner, adapter_name, config, ranks)
    configs[adapter_name] = configs[adapter_name].copy(
        r=config.r, lora_alpha=config.lora_alpha, rank_pattern=dict(config.rank_pattern or {}),
        alpha_pattern=dict(config.alpha_pattern or {}), use_rslora=config.use_rslora, lora_dropout=config.lora_dropout,
    )


def _check_config(current: PeftConfig, new: PeftConfig, parameter_prefix: str) -> None:
    if str(new.peft_type) != str(current.peft_type):
        raise ConfigError("peft_type", str(new.peft_type),
                          f"hot-swapping needs the loaded adapter's peft_type, {str(current.peft_type)!r}")
    if not isinstance(new, LoraConfig):
        raise ConfigError("peft_type", str(new.peft_type), "hot-swapping supports LoRA adapters only")
    prefix = get_method(str(new.peft_type)).prefix
    if parameter_prefix != prefix:
        raise ConfigError("parameter_prefix", parameter_prefix, f"allowed for {new.peft_type!s}: {prefix!r}")
    if new.use_dora:
        raise ConfigError("use_dora", new.use_dora,
                          "hot-swapping supports plain LoRA adapters (no DoRA magnitude); allowed: False")


def _check_not_merged(model: nn.Module, adapter_name: str) -> None:
    merged = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and adapter_name in m.merged_adapters]
    if merged:
        raise MergeError(f"cannot hot-swap adapter {adapter_name!r}: it is merged into the base weights of "
                         f"{merged[:3]}; call unmerge_adapter() first")


class HotswapKeyError(AdapterLoadError, RuntimeError):
    """The new adapter's tensors do not fit the loaded adapter (a module it lacks, a ``modules_to_save`` copy
    missing). Subclasses ``RuntimeError`` as the reference's error does, and ``ValueError``
    (:class:`AdapterLoadError`)."""


def _match(
    entries: dict[str, _Entry], aliases: dict[str, str], state_dict: dict[str, torch.Tensor], adapter_name: str,
    prefix: str,
) -> tuple[list[tuple[_Entry, torch.Tensor]], list[_Entry]]:
    """``(tensors to write, LoRA tensors of the loaded adapter that the new one lacks)``; raises
    :class:`HotswapKeyError` for a tensor the loaded adapter lacks or a lacking non-LoRA tensor."""
    plan: dict[str, tuple[_Entry, torch.Tensor]] = {}
    unexpected: list[str] = []
    for raw, value in state_dict.items():
        key = _normalise(raw)
        key = aliases.get(key, key)
        if key in entries:
            plan[key] = (entries[key], value)
        else:
            unexpected.append(key)
    lacking = [entry for k, entry in entries.items() if k not in plan]
    missing = [entry.key for entry in lacking if entry.layer is None]  # modules_to_save, trainable tokens
    if unexpected:
        extra_mods = sorted({_module_of(k, prefix) for k in unexpected})
        raise HotswapKeyError(
            f"cannot hot-swap adapter {adapter_name!r}: the new adapter has tensors for modules the loaded one does "
            f"not adapt: {extra_mods[:10]} (keys {unexpected[:5]}). Hot-swapping can target the loaded modules or a "
            "subset of them; load it as a separate adapter with load_adapter() instead."
        )
    if missing:
        raise HotswapKeyError(
            f"cannot hot-swap adapter {adapter_name!r}: the new adapter lacks the tensors {missing[:5]} "
            "(modules_to_save / trainable tokens) that the loaded one holds; the old copies would stay in use "
            "(the reference keeps them silently). Load it as a separate adapter with load_adapter() instead."
        )
    return list(plan.values()), lacking


def _zero(lacking: list[_Entry]) -> None:
    """Set the LoRA tensors the new adapter lacks to 0: their modules then compute the base output."""
    with torch.no_grad():
        for entry in lacking:
            entry.tensor.zero_()


def _check_shapes(
    plan: list[tuple[_Entry, torch.Tensor]], config: LoraConfig,
) -> tuple[dict[str, int], dict[str, int]]:
    """Check every shape; return ``({layer path: new rank}, {layer path: new rank} of the layers whose rank
    grows)``."""
    ranks: dict[str, int] = {}
    grown: dict[str, int] = {}
    for entry, value in plan:
        old, new = tuple(entry.tensor.shape), tuple(value.shape)
        if entry.rank_dim is None:
            if old != new:
                raise ShapeMismatchError(f"cannot hot-swap {entry.key!r}: new shape {new}, loaded shape {old}")
            continue
        d = entry.rank_dim
        if len(new) != len(old) or new[:d] + new[d + 1:] != old[:d] + old[d + 1:]:
            raise ShapeMismatchError(f"cannot hot-swap {entry.key!r}: new shape {new}, loaded shape {old} (only the "
                                     f"rank dimension {d} may differ)")
        if new[d] > old[d]:
            grown[entry.layer_path] = new[d]
        previous = ranks.setdefault(entry.layer_path, new[d])
        if previous != new[d]:
            raise ShapeMismatchError(f"cannot hot-swap layer {entry.layer_path!r}: its A and B factors have "
                                     f"different ranks ({previous} and {new[d]})")
    for path, rank in ranks.items():
        expected = pattern_value(config.rank_pattern or {}, path, config.r)
        if expected != rank:
            raise AdapterLoadError(f"cannot hot-swap layer {path!r}: its tensors have rank {rank} but the new "
                                   f"adapter's config says r={expected} (r / rank_pattern); the scaling would be wrong")
    return ranks, grown


def _warn_recompile(grown: dict[str, int]) -> None:
    largest = max(grown.values())
    first = next(iter(grown))
    warnings.warn(
        f"hot-swapping into a compiled model grows the rank of {len(grown)} layer(s) (e.g. {first!r} to "
        f"{grown[first]}): the LoRA weights change shape, so the model recompiles. Call "
        f"prepare_model_for_compiled_hotswap(model, target_rank={largest}) (or larger) after loading the first "
        "adapter and before compiling to swap without recompiling.", PeftWarning, stacklevel=4)


def _write(plan: list[tuple[_Entry, torch.Tensor]], adapter_name: str) -> None:
    with torch.no_grad():
        for entry, value in plan:
            target = entry.tensor
            if entry.rank_dim is None or value.shape[entry.rank_dim] == target.shape[entry.rank_dim]:
                target.copy_(value)
            elif value.shape[entry.rank_dim] < target.shape[entry.rank_dim]:
                target.zero_()
                target.narrow(entry.rank_dim, 0, value.shape[entry.rank_dim]).copy_(value)
            else:
                _grow(entry, value, adapter_name)


def _grow(entry: _Entry, value: torch.Tensor, adapter_name: str) -> None:
    """Give the parameter ``entry.tensor`` the larger-rank ``value`` in place: the object (and so every reference to
    it, in the module and in an optimizer) stays, its shape, storage and values become ``value``'s (cast to its dtype
    and device). The holding ``nn.Linear``/conv's feature counts follow the new shape."""
    target = entry.tensor
    grown = nn.Parameter(value.detach().to(device=target.device, dtype=target.dtype).clone(),
                         requires_grad=target.requires_grad)
    try:
        torch.utils.swap_tensors(target, grown)
    except RuntimeError:  # weak references (e.g. a compiled graph's) forbid swapping: rebind the storage instead
        target.data = grown.data
    layer, dim = entry.layer, entry.rank_dim
    assert layer is not None and dim is not None
    holder = getattr(layer, entry.attr)[adapter_name]
    if isinstance(holder, nn.Module):
        _set_rank_attr(holder, dim, target.shape[dim])
    layer.r[adapter_name] = target.shape[dim]
    layer._bt_cache.pop(adapter_name, None)
    layer._refresh()


def _set_scalings(model: nn.Module, adapter_name: str, config: LoraConfig, ranks: dict[str, int]) -> None:
    for path, layer in _lora_layers(model):
        if path not in ranks:
            continue
        rank = ranks[path]
        alpha = pattern_value(config.alpha_pattern or {}, path, config.lora_alpha)
        scaling = lora_scaling(rank, alpha, config.use_rslora)
        _set_scaling(layer, adapter_name, scaling)
        current_r = layer.r[adapter_name]
        layer.use_rslora[adapter_name] = config.use_rslora
        layer.lora_alpha[adapter_name] = alpha if current_r == rank else _equivalent_alpha(
            scaling, current_r, config.use_rslora)
        _set_dropout(layer, adapter_name, config.lora_dropout)


def _set_dropout(layer: LoraLayer, adapter_name: str, p: float) -> None:
    module = layer.lora_dropout[adapter_name]
    if isinstance(module, nn.Dropout):
        module.p = float(p)
    elif p > 0:
        warnings.warn(f"the new adapter has lora_dropout={p} but the loaded one had none; hot-swapping keeps the "
                      "modules, so no dropout is applied (this only matters in training)", PeftWarning, stacklevel=4)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace the weights and scalings of the loaded adapter ``adapter_name`` with those saved in
    ``model_name_or_path`` (a directory or a Hub repo; ``subfolder``, ``revision``, ... in ``kwargs``), in place.

    The adapter keeps its name and its module and parameter objects; see :func:`hotswap_adapter_from_state_dict`
    for what must match and what is checked. ``torch_device``: where the file is read to (default CPU; values
    are copied onto the adapter's own device). For a compiled model, call
    :func:`prepare_model_for_compiled_hotswap` before compiling.
    """
    allowed = ("subfolder", *HUB_KWARGS)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise TypeError(f"hotswap_adapter() got unexpected keyword arguments {unknown}; allowed: {list(allowed)}")
    config, state_dict = read_adapter(model_name_or_path, device=torch_device, **kwargs)
    prefix = get_method(str(config.peft_type)).prefix
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, parameter_prefix=prefix)  # type: ignore[arg-type]
