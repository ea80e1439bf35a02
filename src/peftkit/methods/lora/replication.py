"""``LoraConfig(layer_replication=...)``: a deeper model built from repeated ranges of the decoder layers.

As the reference's ``tuners_utils.replicate_layers`` (called by ``LoraModel._prepare_model`` before injection):
the layer list found at ``model(.model)*.layers`` (Llama-like), ``.bert?.encoder.layer`` (BERT-like) or ``.h``
(Falcon-like) is replaced by a new ``nn.ModuleList`` holding, for each ``[start, end)`` pair, clones of layers
``start .. end - 1``. ``[[0, 4], [2, 5]]`` on 5 layers gives ``[0, 1, 2, 3, 2, 3, 4]``. A clone is a deep copy of
its layer that shares every parameter with it (buffers are copied), so the base weights are stored once and each
copy gets its own adapter. Every submodule with a ``layer_idx`` (transformers' attention, for the KV cache) gets
the copy's new position, and ``config.num_hidden_layers`` the new count.

peftkit records the replication on the module that owns the layer list, so that a second adapter with the same
``layer_replication`` (or the real injection after a load's meta probe) leaves the model as it is, and so that a
failed injection or load can put the original layers back (:func:`prepare_model` returns that undo).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, LayerReplicationError, MergeError
from ...layers.base import AdapterLayer

#: attribute (in the owner module's ``__dict__``, not a submodule) recording a replication done by peftkit
_MARK = "_peftkit_layer_replication"
_FIELD = "layer_replication"


@dataclass
class Replication:
    """What :func:`replicate_layers` changed on ``owner``: ``layer_map`` (as ``[[start, end], ...]``), the layer list
    it replaced (``original``, kept to undo) and the list it installed, and ``num_hidden_layers`` before."""

    layer_map: list[list[int]]
    owner: nn.Module
    attribute: str
    original: nn.ModuleList
    replicated: nn.ModuleList
    num_hidden_layers: int | None


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(owner, attribute, layers)``: where the reference's ``replicate_layers`` looks for the decoder layers.

    Raises :class:`ConfigError` (a ``ValueError``, as the reference) when there is no such ``nn.ModuleList``.
    """
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):  # some BERT variants nest the encoder under .bert
        model = model.bert
    for owner_path, attribute in (("", "layers"), ("encoder", "layer"), ("", "h")):
        owner = getattr(model, owner_path, None) if owner_path else model
        if owner is not None and hasattr(owner, attribute):
            layers = getattr(owner, attribute)
            if isinstance(layers, nn.ModuleList):
                return owner, attribute, layers
            break
    raise ConfigError(_FIELD, None, "the model has no list of layers to replicate: layer_replication needs an "
                      "nn.ModuleList at model(.model)*.layers (Llama-like), .encoder.layer (BERT-like) or .h "
                      "(Falcon-like), as the reference; use layer_replication=None for this model")


def _clone_sharing_parameters(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are ``layer``'s own objects (the reference's ``clone_module(
    share_weights=True)``, without allocating a copy of each weight first). Buffers are copied."""
    memo = {id(param): param for param in layer.parameters()}
    return copy.deepcopy(layer, memo)


def _check_ranges(layer_map: list[list[int]], count: int) -> None:
    for start, end in layer_map:
        if end > count:
            raise LayerReplicationError(_FIELD, layer_map, f"range [{start}, {end}) goes past the last layer: the "
                                        f"model has {count} layers; allowed: ranges within [0, {count}]")


def _check_no_adapters(layers: nn.ModuleList, layer_map: list[list[int]]) -> None:
    held = [name for name, module in layers.named_modules() if isinstance(module, AdapterLayer)]
    if held:
        raise ConfigError(_FIELD, layer_map, f"the layers already hold adapter layers ({held[:3]}); the copies "
                          "would share those adapters' weights. Replicate with the first adapter (or use None)")


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> Callable[[], None] | None:
    """Replace the layer list of ``model`` by the stack ``layer_map`` describes (see the module docstring).

    Returns the undo (which puts the original layers, ``layer_idx``es and ``num_hidden_layers`` back), or None when
    ``model`` is already replicated with this ``layer_map`` by peftkit (nothing done). Raises
    :class:`ConfigError` naming ``layer_replication`` when the model is already replicated with another map, its
    layers already hold adapters, or it has no layer list; :class:`LayerReplicationError` (also an ``IndexError``,
    as the reference) for a range past the last layer. Nothing is changed when it raises.
    """
    wanted = [[int(start), int(end)] for start, end in layer_map]
    owner, attribute, layers = find_layer_list(model)
    done: Replication | None = owner.__dict__.get(_MARK)
    if done is not None and done.replicated is layers:
        if done.layer_map == wanted:
            return None
        raise ConfigError(_FIELD, layer_map, f"the model's layers are already replicated as {done.layer_map} "
                          "(by another adapter); allowed: the same value or None")
    _check_ranges(wanted, len(layers))
    _check_no_adapters(layers, wanted)
    new_layers: list[nn.Module] = []
    for start, end in wanted:
        for index in range(start, end):
            clone = _clone_sharing_parameters(layers[index])
            for submodule in clone.modules():  # transformers' layer_idx (KV cache slot), as the reference
                if hasattr(submodule, "layer_idx"):
                    submodule.layer_idx = len(new_layers)
            new_layers.append(clone)
    replicated = nn.ModuleList(new_layers)
    config = getattr(owner, "config", None)
    record = Replication(wanted, owner, attribute, layers, replicated,
                         getattr(config, "num_hidden_layers", None))
    setattr(owner, attribute, replicated)
    if record.num_hidden_layers is not None:
        config.num_hidden_layers = len(new_layers)
    owner.__dict__[_MARK] = record
    return functools.partial(_undo, record)  # not a lambda: a PeftModel holding it stays picklable


def _undo(record: Replication) -> None:
    """Put back what :func:`replicate_layers` replaced (only while its layer list is still installed)."""
    owner = record.owner
    if owner.__dict__.get(_MARK) is not record or getattr(owner, record.attribute) is not record.replicated:
        return
    setattr(owner, record.attribute, record.original)
    config = getattr(owner, "config", None)
    if record.num_hidden_layers is not None and config is not None:
        config.num_hidden_layers = record.num_hidden_layers
    del owner.__dict__[_MARK]


def is_replicated(model: nn.Module) -> bool:
    """Whether peftkit replicated ``model``'s layers (and the replicated list is still in place)."""
    return _recorded_map(model) is not None


def prepare_model(model: nn.Module, config: PeftConfig) -> Callable[[], None] | None:
    """``MethodSpec.prepare_model`` of LoRA: replicate the layers as ``config.layer_replication`` says (a falsy
    value, as in the reference, replicates nothing). Returns the undo, or None when nothing changed."""
    layer_map = getattr(config, _FIELD, None)
    if not layer_map:
        return None
    return replicate_layers(model, layer_map)


def check_merge(model: nn.Module, config: PeftConfig) -> None:
    """``MethodSpec.check_merge`` of LoRA: refuse to merge into replicated layers, whose copies share one base
    weight (every copy's update would be added into the same tensor). The reference means to refuse
    (``_check_merge_allowed``) but looks the field up in its ``{adapter: config}`` dict, so it merges silently."""
    layer_map = getattr(config, _FIELD, None) or _recorded_map(model)
    if layer_map:
        raise MergeError(f"Cannot merge LoRA layers when base model layers are replicated (layer_replication="
                         f"{layer_map!r}): the copies of a layer share its base weights, so merging would add every "
                         "copy's update into the same tensor. Use the adapters unmerged, or unload() to get the "
                         "replicated base model back")


def _recorded_map(model: nn.Module) -> list[list[int]] | None:
    """The ``layer_map`` of peftkit's replication of ``model``'s layers still in place, else None."""
    try:
        owner, _, layers = find_layer_list(model)
    except ConfigError:
        return None
    done: Replication | None = owner.__dict__.get(_MARK)
    return done.layer_map if done is not None and done.replicated is layers else None
