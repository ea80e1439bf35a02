"""Adapter state dicts with the reference's key names, derived from the layer structure.

In memory a LoRA weight is ``base_model.model.<path>.lora_A.<adapter>.weight``; the checkpoint key drops the
adapter name: ``base_model.model.<path>.lora_A.weight``. Keys come from each adapter module's
``adapter_state()`` (never from searching parameter names for substrings).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..errors import AdapterLoadError, AdapterNotFoundError, PeftWarning, ShapeMismatchError, closest_names
from ..injection.apply import adopt, mark_loaded
from ..layers.base import AdapterLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.prompt import PromptEncoderDict
from ..layers.shared import SharedAdapterTensors
from ..module_utils import model_embedding, walk_modules
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
    Checkpoint keys never contain the path segments of FSDP1 / activation-checkpoint wrappers (see
    :func:`checkpoint_modules`); in-memory keys are the real paths.
    """
    return {saved: (mem, tensor) for saved, mem, _, tensor in _adapter_entries(model, adapter_name)}


#: ``(checkpoint key, in-memory key, in-memory key without wrapper segments, tensor)``
_Entry = tuple[str, "str | None", "str | None", torch.Tensor]


def _adapter_entries(model: nn.Module, adapter_name: str) -> list[_Entry]:
    """The entries of :func:`adapter_tensor_map`, each with its in-memory key also seen through wrappers (the key
    of a full state dict gathered from an FSDP model)."""
    model = _unwrap_compiled(model)
    configs = _configs(model)
    if adapter_name not in configs:
        raise AdapterNotFoundError(adapter_name, configs)
    bias = getattr(configs[adapter_name], "bias", "none")
    result: dict[str, _Entry] = {}
    aliases: list[tuple[str, str]] = []
    for path, clean, saved_path, module in _prefixed_modules(model, aliases):
        if isinstance(module, PromptEncoderDict):
            for saved, (mem, tensor) in module.adapter_state(adapter_name).items():
                result[saved] = _entry(saved, path, clean, mem, tensor)
        elif isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            for saved, (mem, tensor) in _held_adapter_state(module, adapter_name).items():
                result[saved_path + saved] = _entry(saved_path + saved, path, clean, mem, tensor)
        elif isinstance(module, SharedAdapterTensors) and adapter_name in module:  # held once per model
            key = saved_path.removesuffix(".")
            result[key] = _entry(key, path, clean, adapter_name, module[adapter_name])
    if bias == "all" or (bias != "none" and bias.endswith("_only")):
        for path, clean, name, tensor in _bias_entries(model, only_adapted=bias != "all", adapter_name=adapter_name):
            key = _alias(_join(clean, name), aliases)
            result.setdefault(key, _entry(key, path, clean, name, tensor))
    return list(result.values())


def _held_adapter_state(module: nn.Module, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
    """``module.adapter_state(adapter_name)`` (keys relative to ``module``), looking through the ``base_layer`` chain
    of adapter layers of different methods nested on one module (a mixed model: each method's layer wraps the
    previous one): the state of the first layer of the chain that holds the adapter, with in-memory keys through
    the chain (``base_layer.lora_A.<name>.weight``) and checkpoint keys as the adapter alone on the module has them
    (``lora_A.weight``), so that each adapter of a mixed model saves and loads as an ordinary one. A layer's own
    nesting (LoRA's layers on several parameters of a module) is its ``adapter_state``'s business."""
    layer, depth = module, ""
    while (isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, AdapterLayer)
           and not layer.has_adapter(adapter_name)):
        layer, depth = layer.base_layer, depth + "base_layer."
    if not depth:
        return module.adapter_state(adapter_name)
    return {saved: (depth + mem, tensor) for saved, (mem, tensor) in layer.adapter_state(adapter_name).items()}


def _prefixed_modules(
    model: nn.Module, aliases: list[tuple[str, str]]
) -> Iterator[tuple[str, str, str, nn.Module]]:
    """:func:`checkpoint_modules` with each module's checkpoint key prefix (``"classifier."``; ``""`` for the root):
    a module with a ``checkpoint_transparent_child`` saves its descendants without that child's name. ``aliases``
    collects ``(checkpoint prefix, saved prefix)`` pairs on the way, for keys built after the walk."""
    for path, clean, module in checkpoint_modules(model):
        child = getattr(type(module), "checkpoint_transparent_child", None)
        if child is not None:
            aliases.append((_join(clean, child) + ".", f"{clean}." if clean else ""))
        yield path, clean, _alias(f"{clean}." if clean else "", aliases), module


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path + name


def _entry(saved: str, path: str, clean: str, mem: str | None, tensor: torch.Tensor) -> _Entry:
    if mem is None:
        return (saved, None, None, tensor)
    return (saved, _join(path, mem), _join(clean, mem), tensor)


def _wrapper_child(module: nn.Module) -> str | None:
    """The name of the child that ``module`` wraps when it is an FSDP1 unit or an activation-checkpoint wrapper
    (``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module``): a path segment that no checkpoint key contains.
    Found by type, never by looking at names; the wrapper classes are only looked up when torch loaded them."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp is not None and isinstance(module, fsdp.FullyShardedDataParallel):
        return "_fsdp_wrapped_module"
    ckpt = sys.modules.get("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    if ckpt is not None and isinstance(module, ckpt.ActivationWrapper):
        return "_checkpoint_wrapped_module"
    return None


def checkpoint_modules(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(in-memory path, checkpoint path, module)`` for ``model``'s modules, in ``named_modules`` order.

    The checkpoint path leaves out the child that an FSDP1 unit or activation-checkpoint wrapper wraps (the
    unwrapped model's path, which is what ``state_dict()`` of an FSDP model and the reference's files use). Adapter
    layers, ``modules_to_save`` wrappers and prompt encoders are yielded but not descended into.
    """
    leaves = (PromptEncoderDict, AdapterLayer, ModulesToSaveWrapper)
    seen: set[int] = set()
    stack: list[tuple[str, str, nn.Module]] = [("", "", model)]
    while stack:
        path, clean, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, clean, module
        if isinstance(module, leaves):
            continue
        wrapped = _wrapper_child(module)
        children = [
            (_join(path, name), clean if name == wrapped else _join(clean, name), child)
            for name, child in module._modules.items() if child is not None
        ]
        stack.extend(reversed(children))


def _bias_entries(
    model: nn.Module, only_adapted: bool, adapter_name: str
) -> Iterator[tuple[str, str, str, torch.Tensor]]:
    """``(in-memory module path, checkpoint module path, parameter name, bias)`` of the biases ``bias="all"``
    (``only_adapted=False``) or ``bias="<method>_only"`` selects: the base layers' biases of the adapter layers
    holding ``adapter_name`` (``q_proj.base_layer.bias``), and for ``"all"`` also every other module's bias outside
    adapter internals (``lora_B``'s bias, ``modules_to_save`` copies and prompt encoders are not base biases)."""
    for path, clean, module in checkpoint_modules(model):
        if isinstance(module, AdapterLayer):
            if only_adapted and not module.has_adapter(adapter_name):
                continue
            yield from _base_biases(module, path, clean)
        elif not only_adapted and not isinstance(module, (PromptEncoderDict, ModulesToSaveWrapper)):
            bias = module._parameters.get("bias")
            if bias is not None:
                yield path, clean, "bias", bias


def _base_biases(layer: AdapterLayer, path: str, clean: str) -> Iterator[tuple[str, str, str, torch.Tensor]]:
    """The biases in the base module of adapter layer ``layer`` (at ``path`` / ``clean``), looking into adapter
    layers nested inside that base (``MultiheadAttention``'s LoRA ``out_proj``: ``attn.base_layer.out_proj.
    base_layer.bias``, as the reference saves it)."""
    base_path = _base_layer_path(layer)
    for sub_path, sub_clean, sub in checkpoint_modules(layer.get_base_layer()):
        sub_mem, sub_saved = _join(_join(path, base_path), sub_path), _join(_join(clean, base_path), sub_clean)
        if sub_path and isinstance(sub, AdapterLayer):
            yield from _base_biases(sub, sub_mem, sub_saved)
        elif (bias := sub._parameters.get("bias")) is not None:
            yield sub_mem, sub_saved, "bias", bias


def _base_bias_map(model: nn.Module, adapter_name: str) -> TensorMap:
    """``{checkpoint key without base_model.model.: (in-memory key, bias)}`` of every base bias (``bias="all"``)."""
    out: TensorMap = {}
    for path, clean, name, tensor in _bias_entries(model, only_adapted=False, adapter_name=adapter_name):
        out[_strip(_join(clean, name))] = (_join(path, name), tensor)
    return out


def _alias(path: str, aliases: list[tuple[str, str]]) -> str:
    """The checkpoint path of the module at checkpoint path ``path`` (a transparent child's name removed)."""
    for mem_prefix, saved_prefix in aliases:
        if path.startswith(mem_prefix):
            return saved_prefix + path[len(mem_prefix):]
    return path


def _base_layer_path(layer: AdapterLayer) -> str:
    parts = ["base_layer"]
    inner = layer.base_layer
    while isinstance(inner, AdapterLayer):
        parts.append("base_layer")
        inner = inner.base_layer
    return ".".join(parts)


def embedding_tensor_map(model: nn.Module) -> TensorMap:
    """``{checkpoint key: (in-memory key, weight)}`` of the full input and output embedding matrices (saved when
    the vocabulary was resized), under the reference's keys (``embed_tokens.weight``, or
    ``embed_tokens.base_layer.weight`` when the embedding is adapted).

    The embeddings are the modules ``get_input_embeddings()`` / ``get_output_embeddings()`` return, found by
    identity (never by name, so a sibling such as ``embed_tokens_extra`` is not one); an output embedding that
    shares its weight with the input one is left out. A model without those methods, or whose methods raise
    (transformers 5's ConvNeXt, Wav2Vec2, CLIP), contributes its adapted ``nn.Embedding`` layers.
    """
    model = _unwrap_compiled(model)
    wanted = embedding_modules(model)
    result: TensorMap = {}
    for path, _, saved, module in _prefixed_modules(model, []):
        if isinstance(module, (ModulesToSaveWrapper, PromptEncoderDict)):
            continue  # a copy in modules_to_save is saved with the adapter; internals are never embeddings
        adapted = isinstance(module, AdapterLayer)
        target = module.get_base_layer() if adapted else module
        if wanted:
            hit = any(w is module or w is target for w in wanted)
        else:
            hit = adapted and isinstance(target, nn.Embedding)
        weight = getattr(target, "weight", None)
        if not hit or not isinstance(weight, torch.Tensor) or any(weight is t for _, t in result.values()):
            continue
        suffix = f"{_base_layer_path(module)}.weight" if adapted else "weight"  # type: ignore[arg-type]
        result[saved + suffix] = (_join(path, suffix), weight)
    return result


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The modules ``model.get_input_embeddings()`` and ``model.get_output_embeddings()`` return (adapter layers
    and ``modules_to_save`` wrappers included, as attribute lookups return them); a method that is missing, returns
    None or raises (``NotImplementedError`` in transformers 5 for models without token embeddings) adds nothing."""
    found: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = model_embedding(model, getter)
        if module is not None and all(module is not m for m in found):
            found.append(module)
    return found


def input_embedding(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``, or None when the method is missing, returns None or raises."""
    return model_embedding(model, "get_input_embeddings")


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
    entries = _adapter_entries(model, adapter_name) + _suffix_only_entries(_unwrap_compiled(model), adapter_name)
    if save_embedding_layers is True:
        embeddings = embedding_tensor_map(model)
        if not embeddings:
            warnings.warn(f"save_embedding_layers=True, but {type(_unwrap_compiled(model)).__name__} has no "
                          "identifiable embedding layer (get_input_embeddings()/get_output_embeddings() are missing, "
                          "return None or raise, and no nn.Embedding is adapted); saving the adapter without "
                          "embeddings", PeftWarning, stacklevel=2)
        entries += [(saved, mem, mem, tensor) for saved, (mem, tensor) in embeddings.items()]
    out: dict[str, torch.Tensor] = {}
    for saved, mem, clean_mem, tensor in entries:
        out[saved] = _lookup(state_dict, mem, clean_mem, tensor).detach()
    if state_dict is None:  # as the reference: a caller's explicit state dict is taken as it is
        _warn_unsharded(out, adapter_name)
    config = _configs(_unwrap_compiled(model))[adapter_name]
    export = get_method(config.peft_type).export_state
    return out if export is None else export(_unwrap_compiled(model), config, adapter_name, out)


def _warn_unsharded(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Warn when adapter tensors are empty: the local shards of a DeepSpeed ZeRO-3 / FSDP model whose parameters
    were not gathered before saving (the reference warns for such LoRA tensors)."""
    empty = [key for key, tensor in tensors.items() if tensor.numel() == 0]
    if empty:
        more = f" (+{len(empty) - 3} more)" if len(empty) > 3 else ""
        warnings.warn(
            f"adapter {adapter_name!r}: {len(empty)} tensor(s) are empty, e.g. {empty[:3]}{more}: the parameters of a "
            "DeepSpeed ZeRO-3 / FSDP model were not gathered before saving, so the file would be incomplete. Save "
            "inside deepspeed.zero.GatheredParameters([...], modifier_rank=None) (ZeRO-3) or "
            "FullyShardedDataParallel.summon_full_params(model) (FSDP), or pass a gathered state_dict=.",
            PeftWarning, stacklevel=3)


def _lookup(
    state_dict: dict[str, torch.Tensor] | None, mem: str | None, clean_mem: str | None, tensor: torch.Tensor
) -> torch.Tensor:
    """The value of a tensor in a caller's ``state_dict`` (keyed by the in-memory path, or, for a state dict
    gathered from an FSDP model, by the path without wrapper segments), else the model's own ``tensor``."""
    if state_dict is None:
        return tensor
    for key in (mem, clean_mem):
        if key is not None and key in state_dict:
            return state_dict[key]
    return tensor


def _strip(key: str) -> str:
    return key.removeprefix(WRAPPER_PREFIX)


def _apply_key_mapping(keys: list[str], key_mapping: dict[str, str] | None) -> dict[str, str]:
    """``{normalised key: original key}``; ``key_mapping`` regexes apply after ``base_model.model.`` is stripped.

    Two checkpoint keys that normalise to one key (``base_model.model.x.lora_A.weight`` beside ``x.lora_A.weight``,
    or two keys a ``key_mapping`` maps together) name the same tensor twice, with possibly different values: the file
    is ambiguous, and :class:`AdapterLoadError` names both keys instead of loading whichever came last."""
    out: dict[str, str] = {}
    for key in keys:
        norm = _strip(key)
        for pattern, repl in (key_mapping or {}).items():
            norm, n = re.subn(pattern, repl, norm)
            if n:
                break
        if norm in out:
            raise AdapterLoadError(
                f"checkpoint keys {out[norm]!r} and {key!r} both name the same adapter tensor {norm!r} (with and "
                "without the 'base_model.model.' prefix, or mapped together by key_mapping); allowed: one key per "
                "tensor. The file is ambiguous; save the adapter again.")
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

    See :func:`_load_state_dict` for the rules. In addition, a module that the reference's plain-suffix
    ``modules_to_save`` rule wraps and peftkit's dot-boundary rule does not (DistilBERT's ``pre_classifier`` for
    ``"classifier"``) is wrapped for ``adapter_name`` when the checkpoint holds its weights, so that files written by
    the reference load completely (with a warning naming the modules); a failed load unwraps it again.
    """
    model = _unwrap_compiled(model)
    state, undo = _wrap_suffix_matched(model, peft_model_state_dict, adapter_name, key_mapping)
    try:
        return _load_state_dict(model, state, adapter_name, ignore_mismatched_sizes,
                                low_cpu_mem_usage, key_mapping, assign)
    except BaseException:
        undo()
        raise


def check_state_dict_shapes(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    key_mapping: dict[str, str] | None = None,
) -> None:
    """Run :func:`set_peft_model_state_dict`'s checks (shapes, keys) without writing anything: raises
    :class:`ShapeMismatchError` / :class:`AdapterLoadError` as the load would. For a probe adapter whose tensors
    are on the meta device, so that a config disagreeing with its checkpoint fails before its sizes are allocated;
    the probe (and any ``prepare_load`` change to it) is the caller's to remove."""
    model = _unwrap_compiled(model)
    state, undo = _wrap_suffix_matched(model, peft_model_state_dict, adapter_name, key_mapping)
    try:
        _load_state_dict(model, state, adapter_name, ignore_mismatched_sizes, False, key_mapping, check_only=True)
    finally:
        undo()


def _suffix_only_targets(model: nn.Module, adapter_name: str) -> list[tuple[str, str, str, nn.Module]]:
    """``(in-memory path, checkpoint path, checkpoint key prefix, module)`` of the modules that the reference's
    plain-suffix rule wraps for the ``modules_to_save`` of ``adapter_name`` and peftkit does not
    (:func:`~peftkit.injection.plan.suffix_only_modules_to_save`; DistilBERT's ``pre_classifier`` for
    ``"classifier"``), leaving out those wrapped for ``adapter_name`` since and adapter layers (the reference
    cannot wrap those: its ``modules_to_save`` raises ``TypeError``). ``module`` is the base module (a
    wrapper's ``original_module``). Empty, after no walk, for adapters without ``modules_to_save``."""
    from ..injection.match import matches
    from ..injection.plan import candidate_modules, suffix_only_modules_to_save

    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    entries = list(getattr(config, "modules_to_save", None) or [])
    if not entries:
        return []
    names = [name for name, _ in candidate_modules(model)]
    extra = set(suffix_only_modules_to_save(names, entries, [n for n in names if matches(entries, n)]))
    if not extra:
        return []
    out = []
    for path, clean, saved, module in _prefixed_modules(model, []):
        if path not in extra or (isinstance(module, ModulesToSaveWrapper) and module.has_adapter(adapter_name)):
            continue
        if isinstance(module, AdapterLayer):  # adapted (e.g. all-linear's pre_classifier): the reference refuses it
            continue
        out.append((path, clean, saved, module.original_module if isinstance(module, ModulesToSaveWrapper) else module))
    return out


def _suffix_only_entries(model: nn.Module, adapter_name: str) -> list[_Entry]:
    """The base weights of :func:`_suffix_only_targets` under the keys the reference saves its copies with
    (``pre_classifier.weight``): the reference requires them when it loads the file (it wraps those modules and
    fails with a ``KeyError`` on a file without them). peftkit did not train them, so they equal the base weights,
    which is what the reference's copy holds before training."""
    entries: list[_Entry] = []
    for path, clean, saved, module in _suffix_only_targets(model, adapter_name):
        inner = "original_module." if module is not _unwrap_compiled(model).get_submodule(path) else ""
        for key, tensor in module.state_dict(keep_vars=True).items():
            entries.append((saved + key, _join(path, inner + key), _join(clean, inner + key), tensor))
    return entries


def _wrap_suffix_matched(
    model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, key_mapping: dict[str, str] | None
) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """Prepare loading ``state`` when it holds weights of :func:`_suffix_only_targets`: weights equal to the base
    module's (as peftkit saves them) are dropped (nothing to load); others (the reference trained them) get the
    module wrapped for ``adapter_name`` so that they load, with a warning. Returns the state to load and a function
    that undoes the wrapping. The new copies take the active/trainable/enabled state that ``adapter_name`` has in
    the model's other adapter modules."""
    from ..injection.apply import set_submodule

    targets = _suffix_only_targets(model, adapter_name)
    if not targets:
        return state, lambda: None
    incoming = _apply_key_mapping(list(state), key_mapping)
    dropped: set[str] = set()
    done: list[tuple[str, nn.Module]] = []
    for path, _, saved, base in targets:
        prefix = _strip(saved)
        mine = {norm[len(prefix):]: orig for norm, orig in incoming.items() if norm.startswith(prefix)}
        if not mine:
            continue
        own = base.state_dict()
        if all(k in own and _same(own[k], state[orig]) for k, orig in mine.items()):
            dropped.update(mine.values())
            continue
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            set_submodule(model, path, ModulesToSaveWrapper(module, adapter_name))
        done.append((path, module))
        _follow_siblings(model, model.get_submodule(path), adapter_name)
    if done:
        warnings.warn(
            f"the checkpoint of adapter {adapter_name!r} holds trained weights of {[n for n, _ in done]}, which its "
            "modules_to_save matches only by plain suffix (the rule of 🤗 PEFT, which probably wrote it); wrapped "
            "them for this adapter so that they load", PeftWarning, stacklevel=3)

    def undo() -> None:
        for path, original in reversed(done):
            if isinstance(original, ModulesToSaveWrapper):
                original.delete_adapter(adapter_name)
            else:
                set_submodule(model, path, original)

    return {k: v for k, v in state.items() if k not in dropped}, undo


def _same(own: torch.Tensor, value: torch.Tensor) -> bool:
    """``value`` (from a file) is exactly the module's tensor, as saved unchanged: same shape, dtype and values."""
    return own.shape == value.shape and own.dtype == value.dtype and torch.equal(own, value.to(own.device))


def _follow_siblings(model: nn.Module, wrapper: ModulesToSaveWrapper, adapter_name: str) -> None:
    """Give ``wrapper``'s copy of ``adapter_name`` the state the adapter has in another adapter module of
    ``model``: active or not, trainable or frozen, adapters enabled or disabled, training or eval mode."""
    for _, module in walk_modules(model, (AdapterLayer, ModulesToSaveWrapper)):
        if module is wrapper or not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue
        if not module.has_adapter(adapter_name):
            continue
        trainable = {name: any(p.requires_grad for p in wrapper.adapter_parameters(name))
                     for name in wrapper.active_adapters}
        trainable[adapter_name] = any(p.requires_grad for p in module.adapter_parameters(adapter_name))
        active = module.active_adapters if adapter_name in module.active_adapters else wrapper.active_adapters
        wrapper.set_adapter(active, trainable=trainable)
        wrapper.enable_adapters(not getattr(module, "disable_adapters", False))
        wrapper.train(module.training)
        return


def _load_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    key_mapping: dict[str, str] | None = None,
    assign: bool = False,
    check_only: bool = False,
) -> _IncompatibleKeys:
    """Load checkpoint tensors into adapter ``adapter_name``; returns ``(missing_keys, unexpected_keys)``.
    ``check_only``: stop after the checks, writing nothing (:func:`check_state_dict_shapes`).

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
    method = get_method(config.peft_type) if config is not None else None
    if method is not None and method.prepare_load is not None:
        method.prepare_load(model, config, adapter_name)
    if method is not None and method.convert_checkpoint is not None:
        peft_model_state_dict = method.convert_checkpoint(model, peft_model_state_dict, adapter_name)
    expected = {_strip(k): v for k, v in adapter_tensor_map(model, adapter_name).items()}
    incoming = _apply_key_mapping(list(peft_model_state_dict), key_mapping)
    # embedding matrices and base biases are looked for only when the checkpoint holds keys that are not adapter
    # tensors: like the reference, a file's bias tensors load whatever this adapter's ``bias`` setting says
    embeddings = {} if expected.keys() >= incoming.keys() else {
        **_base_bias_map(model, adapter_name), **{_strip(k): v for k, v in embedding_tensor_map(model).items()}}
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    loaded: list[str] = []  # the checkpoint key of each plan entry
    mismatched: list[str] = []
    skipped: set[str] = set()
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
            skipped.add(norm)  # reported missing, as the reference does
            continue
        plan.append((target[1], value))
        loaded.append(original)
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
    _check_missing_size(expected, set(incoming) - skipped, [value for _, value in plan], adapter_name)
    if check_only:
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=unexpected)
    _warn_non_finite(loaded, [value for _, value in plan], adapter_name)
    _copy(plan, assign)
    present = set(incoming) - skipped
    missing = [mem or norm for norm, (mem, _) in expected.items() if norm not in present]
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


#: a load may invent (as zeros) adapter tensors missing from the checkpoint up to this many bytes, or up to as many
#: bytes as the checkpoint holds when that is more
MISSING_BYTES_FLOOR = 16 * 2**20


def _check_missing_size(expected: dict[str, tuple[str | None, torch.Tensor]], present: set[str],
                        values: list[torch.Tensor], adapter_name: str) -> None:
    """Refuse (:class:`AdapterLoadError`) a load whose checkpoint lacks adapter tensors that are not allocated yet
    (meta: a probe, or an inference load, which would fill them with zeros) and that would take more bytes than the
    checkpoint's tensors and more than :data:`MISSING_BYTES_FLOOR`: the config then asks for sizes no file backs
    (e.g. ``rank_pattern: {"k_proj": 1000000000}`` for a module the checkpoint has no tensor of), and honouring it
    would allocate gigabytes. Smaller gaps load, reported as missing keys."""
    absent = [(norm, tensor) for norm, (_, tensor) in expected.items() if norm not in present and tensor.is_meta]
    wanted = sum(tensor.numel() * tensor.element_size() for _, tensor in absent)
    held = sum(value.numel() * value.element_size() for value in values)
    if wanted > max(held, MISSING_BYTES_FLOOR):
        largest = sorted(absent, key=lambda item: -item[1].numel())[:3]
        shown = ", ".join(f"{norm} {tuple(tensor.shape)}" for norm, tensor in largest)
        raise AdapterLoadError(
            f"the checkpoint lacks {len(absent)} tensor(s) of adapter {adapter_name!r} that its config asks for, "
            f"{wanted / 2**20:.1f} MiB at the config's sizes (largest: {shown}), more than the "
            f"{held / 2**20:.1f} MiB it holds; the config does not belong to this checkpoint (check r / rank_pattern "
            "/ target_modules)")


def _warn_non_finite(names: list[str], values: list[torch.Tensor], adapter_name: str, shown: int = 3) -> None:
    """Warn (:class:`PeftWarning`) when loaded floating-point tensors hold NaN or inf, naming the first ``shown`` and
    the count: such an adapter makes every output NaN. One ``isfinite(t).all()`` per floating tensor (meta skipped)."""
    bad = [name for name, value in zip(names, values)
           if value.is_floating_point() and not value.is_meta and not _all_finite(value)]
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        warnings.warn(f"{len(bad)} checkpoint tensor(s) of adapter {adapter_name!r} hold NaN or inf values: "
                      f"{', '.join(repr(n) for n in bad[:shown])}{more}. The model's outputs will be NaN or inf; "
                      "the checkpoint is probably corrupt or from a diverged training run.", PeftWarning, stacklevel=3)


def _all_finite(value: torch.Tensor) -> bool:
    """``isfinite(value).all()`` for every floating dtype a checkpoint may hold: torch has no ``isfinite`` for some
    float8 dtypes (``float8_e4m3fn``), which are checked upcast to float32 (exact: every float8 value is one)."""
    if value.element_size() == 1:
        value = value.to(torch.float32)
    return bool(torch.isfinite(value).all())


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
