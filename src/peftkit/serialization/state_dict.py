"""Adapter state dicts with the reference's key names, derived from the layer structure.

In memory a LoRA weight is ``base_model.model.<path>.lora_A.<adapter>.weight``; the checkpoint key drops the
adapter name: ``base_model.model.<path>.lora_A.weight``. Keys come from each adapter module's
``adapter_state()`` (never from searching parameter names for substrings).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..errors import AdapterLoadError, AdapterNotFoundError, PeftWarning, ShapeMismatchError, closest_names
from ..injection.apply import adopt, mark_loaded
from ..layers.base import AdapterLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.prompt import PromptEncoderDict
from ..module_utils import walk_modules
from ..registry import get_method

WRAPPER_PREFIX = "base_model.model."
TensorMap = dict[str, tuple[str, torch.Tensor]]


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _configs(model: nn.Module) -> dict[str, Any]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise AdapterLoadError(f"{type(model).__name__} holds no adapters (no peft_config); inject an adapter first")
    return configs


def adapter_tensor_map(model: nn.Module, adapter_name: str) -> TensorMap:
    """``{checkpoint key: (in-memory key, tensor)}`` of adapter ``adapter_name``, keys relative to ``model``.

    Includes the adapter layers' tensors, ``modules_to_save`` copies (under the original module's path), the
    biases selected by the adapter's ``bias`` setting, and a prompt encoder's ``prompt_embeddings`` (an absolute key;
    its in-memory key is None when the tensor is computed by an encoder head, which cannot be loaded into).
    A module with a ``checkpoint_transparent_child`` (the prompt tuner) saves its descendants without that child's
    name (``base_model.score.weight`` instead of ``base_model.model.score.weight``, as the reference does).
    """
    model = _unwrap_compiled(model)
    configs = _configs(model)
    if adapter_name not in configs:
        raise AdapterNotFoundError(adapter_name, configs)
    bias = getattr(configs[adapter_name], "bias", "none")
    result: TensorMap = {}
    aliases: list[tuple[str, str]] = []
    for path, module in walk_modules(model, (PromptEncoderDict, AdapterLayer, ModulesToSaveWrapper)):
        child = getattr(type(module), "checkpoint_transparent_child", None)
        if child is not None:
            aliases.append((f"{path}.{child}." if path else f"{child}.", f"{path}." if path else ""))
        if isinstance(module, PromptEncoderDict):
            for saved, (mem, tensor) in module.adapter_state(adapter_name).items():
                result[saved] = (None if mem is None else f"{path}.{mem}", tensor)  # type: ignore[assignment]
        elif isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            saved_path = _alias(path + ".", aliases)
            for saved, (mem, tensor) in module.adapter_state(adapter_name).items():
                result[f"{saved_path}{saved}"] = (f"{path}.{mem}", tensor)
            if bias == "lora_only" and isinstance(module, AdapterLayer) and module.has_adapter(adapter_name):
                base_bias = getattr(module.get_base_layer(), "bias", None)
                if base_bias is not None:
                    key = f"{path}.{_base_layer_path(module)}.bias"
                    result[key] = (key, base_bias)
    if bias == "all":
        taken = {m for m, _ in result.values()}
        for name, param in model.named_parameters():
            if name.endswith(".bias") and name not in taken and _outside_internals(name):
                result[name] = (name, param)
    return result


#: path segments that FSDP1 and torch's activation-checkpoint wrappers insert; never part of a checkpoint key
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _alias(path: str, aliases: list[tuple[str, str]]) -> str:
    """The checkpoint path of the module at ``path`` (aliases applied, wrapper segments removed)."""
    for mem_prefix, saved_prefix in aliases:
        if path.startswith(mem_prefix):
            path = saved_prefix + path[len(mem_prefix):]
            break
    for segment in _WRAPPER_SEGMENTS:
        path = path.replace(segment, "")
    return path


def _base_layer_path(layer: AdapterLayer) -> str:
    parts = ["base_layer"]
    inner = layer.base_layer
    while isinstance(inner, AdapterLayer):
        parts.append("base_layer")
        inner = inner.base_layer
    return ".".join(parts)


_INTERNAL = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|original_module)(\.|$)")


def _outside_internals(name: str) -> bool:
    return _INTERNAL.search(name.rsplit(".", 1)[0]) is None


def embedding_tensor_map(model: nn.Module) -> TensorMap:
    """The full input and output embedding matrices (saved when the vocabulary was resized)."""
    model = _unwrap_compiled(model)
    result: TensorMap = {}
    for name, module in walk_modules(model, (AdapterLayer, ModulesToSaveWrapper)):
        target = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if not isinstance(target, nn.Embedding) or any(n in name for n in ("modules_to_save", "original_module")):
            continue
        key = f"{name}.{_base_layer_path(module)}.weight" if isinstance(module, AdapterLayer) else f"{name}.weight"
        result[key] = (key, target.weight)
    result.update(_output_embedding_map(model, result))
    return result


def _output_embedding_map(model: nn.Module, inputs: TensorMap) -> TensorMap:
    """The untied output embedding (``lm_head``, an ``nn.Linear`` resized with the vocabulary), as the reference saves
    it; nothing when the model has none or it shares its weight with an input embedding."""
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except (AttributeError, NotImplementedError):
        output = None
    if output is None:
        return {}
    for name, module in model.named_modules():
        if module is not output or any(n in name for n in ("modules_to_save", "original_module")):
            continue
        target = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or any(weight is t for _, t in inputs.values()):
            return {}
        key = f"{name}.{_base_layer_path(module)}.weight" if isinstance(module, AdapterLayer) else f"{name}.weight"
        return {key: (key, weight)}
    return {}


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of adapter ``adapter_name``: keys without the adapter name, values detached.

    Keys are relative to ``model``: a ``PeftModel`` gives ``base_model.model.<path>...``, a model with injected
    adapters gives ``<path>...``. With ``state_dict`` (e.g. gathered by a trainer) values are taken from it.
    ``save_embedding_layers=True`` also stores the full embedding matrices (``"auto"``: see
    :func:`should_save_embeddings`).
    """
    mapping = adapter_tensor_map(model, adapter_name)
    if save_embedding_layers is True:
        mapping.update(embedding_tensor_map(model))
    out: dict[str, torch.Tensor] = {}
    for saved, (mem, tensor) in mapping.items():
        value = state_dict.get(mem, tensor) if state_dict is not None else tensor
        out[saved] = value.detach()
    config = _configs(_unwrap_compiled(model))[adapter_name]
    export = get_method(config.peft_type).export_state
    return out if export is None else export(_unwrap_compiled(model), config, adapter_name, out)


def _strip(key: str) -> str:
    return key.removeprefix(WRAPPER_PREFIX)


def _apply_key_mapping(keys: list[str], key_mapping: dict[str, str] | None) -> dict[str, str]:
    """``{normalised key: original key}``; ``key_mapping`` regexes apply after ``base_model.model.`` is stripped."""
    out: dict[str, str] = {}
    for key in keys:
        norm = _strip(key)
        for pattern, repl in (key_mapping or {}).items():
            norm, n = re.subn(pattern, repl, norm)
            if n:
                break
        out[norm] = key
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    key_mapping: dict[str, str] | None = None,
    assign: bool = False,
) -> _IncompatibleKeys:
    """Load checkpoint tensors into adapter ``adapter_name``; returns ``(missing_keys, unexpected_keys)``.

    Keys may carry the ``base_model.model.`` prefix or not, whatever ``model`` is. Every shape is checked before
    anything is written: a mismatch raises :class:`ShapeMismatchError` (or, with ``ignore_mismatched_sizes``, the
    tensor is skipped with a warning) and the model is left unchanged. A checkpoint none of whose keys belongs to
    this adapter raises :class:`AdapterLoadError` instead of loading nothing silently. Embedding matrices saved
    beside the adapter (resized vocabularies) are loaded into the base embeddings. A method's ``prepare_load`` hook
    runs first (AdaLoRA resizes its layers to the stored config's ``rank_pattern``, as the reference does).

    ``assign=True`` (for tensors nobody else holds, e.g. just read by ``load_peft_weights``, whose tensors never map
    the file) lets a parameter take a checkpoint tensor's storage instead of copying it where the layout allows:
    same dtype, device and strides, contiguous; the parameter itself is not a view.
    """
    model = _unwrap_compiled(model)
    config = _configs(model).get(adapter_name)
    prepare = get_method(config.peft_type).prepare_load if config is not None else None
    if prepare is not None:
        prepare(model, config, adapter_name)
    expected = {_strip(k): v for k, v in adapter_tensor_map(model, adapter_name).items()}
    incoming = _apply_key_mapping(list(peft_model_state_dict), key_mapping)
    # embedding matrices are looked for only when the checkpoint holds keys that are not adapter tensors
    embeddings = {} if expected.keys() >= incoming.keys() else {
        _strip(k): v for k, v in embedding_tensor_map(model).items()}
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    mismatched: list[str] = []
    unexpected: list[str] = []
    for norm, original in incoming.items():
        target = expected.get(norm) or embeddings.get(norm)
        if target is None:
            unexpected.append(original)
            continue
        value = peft_model_state_dict[original]
        if target[0] is None:
            raise AdapterLoadError(
                f"{original!r} of adapter {adapter_name!r} is computed by a trainable prompt encoder head (P-tuning, "
                "prefix projection) and cannot be loaded into; load the adapter for inference (is_trainable=False)"
            )
        if tuple(value.shape) != tuple(target[1].shape):
            mismatched.append(f"{original}: checkpoint {tuple(value.shape)} vs model {tuple(target[1].shape)}")
            continue
        plan.append((target[1], value))
    if mismatched and not ignore_mismatched_sizes:
        raise ShapeMismatchError(
            f"size mismatch for {len(mismatched)} tensor(s) of adapter {adapter_name!r}: " + "; ".join(mismatched[:5])
            + ". Check r / rank_pattern / target_modules, or resize the base embeddings before loading."
        )
    if mismatched:
        warnings.warn(f"skipped tensors with mismatched sizes: {mismatched}", PeftWarning, stacklevel=2)
    if peft_model_state_dict and not plan:
        sample = next(iter(incoming))
        raise AdapterLoadError(
            f"none of the {len(incoming)} checkpoint tensors belongs to adapter {adapter_name!r} of this model "
            f"(e.g. {incoming[sample]!r}; closest model keys: {closest_names(sample, expected)}). The checkpoint was "
            "probably made for a different model or module naming; pass key_mapping to translate its keys."
        )
    _copy(plan, assign)
    present = set(incoming)
    missing = [mem or norm for norm, (mem, _) in expected.items() if norm not in present]
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def _copy(plan: list[tuple[torch.Tensor, torch.Tensor]], assign: bool) -> None:
    """Write each checkpoint ``value`` into its ``target`` (same shape): meta targets and, with ``assign``, targets
    that can share the value (:func:`_can_assign`) take it as their data; others are copied into."""
    with torch.no_grad():
        for target, value in plan:
            device = mark_loaded(target)  # the device of an adapter tensor left on meta while loading
            if target.is_meta:
                moved = value.to(device=device or value.device, dtype=target.dtype)
                adopt(target, moved if assign or moved is not value else value.clone())
            elif assign and _can_assign(target, value):
                target.data = value
            else:
                target.copy_(value)


def _can_assign(target: torch.Tensor, value: torch.Tensor) -> bool:
    """A parameter may take ``value``'s storage when nothing would notice: same dtype, device and strides, a leaf
    that is not a view, and ``value`` a plain dense tensor without autograd history (the caller of ``assign=True``
    guarantees nobody else holds it, e.g. :func:`~peftkit.serialization.files.load_peft_weights`' own buffer)."""
    return (isinstance(target, nn.Parameter) and target._base is None
            and type(value) is torch.Tensor and not value.requires_grad and value.layout == torch.strided
            and value.dtype == target.dtype and value.device == target.device
            and value.stride() == target.stride() and value.is_contiguous())
