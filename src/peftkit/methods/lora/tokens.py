"""LoRA's ``trainable_token_indices``: TrainableTokens rows trained beside the LoRA layers, under the same adapter name.

The reference wraps each chosen embedding in a ``TrainableTokensWrapper`` holding a ``token_adapter``
(a ``TrainableTokensLayer``) and saves the rows under ``<module>.token_adapter.trainable_tokens_delta``. peftkit puts
a :class:`TokenAdapterLayer` (a TrainableTokens layer) at the module's own name and writes the same keys.

Shapes: per adapter ``trainable_tokens_delta: (k, dim)`` replaces rows ``token_indices`` (``k`` of them) of the base
weight ``W: (num_embeddings, dim)`` (see :mod:`peftkit.methods.trainable_tokens.layers`).

Tied embeddings (``tie_word_embeddings=True``): the modules sharing the input embedding's weight (the output head)
get a tied layer using the embedding's rows, unless the config gives a tied module rows of its own that differ from
the embedding's and ``ensure_weight_tying`` is False (then that module trains its own rows), as the reference does;
with ``ensure_weight_tying=True`` differing rows are an error. A tied layer saves nothing (the rows are the
embedding's), as the reference's tied wrapper.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig, check
from ...errors import (
    ConfigError,
    NoMatchingPeftModuleError,
    PeftWarning,
    UnsupportedModuleError,
    closest_names,
)
from ...injection.apply import AppliedPlan, adapter_dtype, set_submodule
from ...injection.match import matches
from ...injection.plan import candidate_modules
from ...layers.base import AdapterLayer, expand_rows
from ...layers.modules_to_save import ModulesToSaveWrapper
from ..trainable_tokens import TrainableTokensLayer
from ..trainable_tokens import _input_embedding_name as input_embedding_name
from ..trainable_tokens import _ties_embeddings as ties_embeddings
from .tied import bind_tied_layers, check_tied_targets

FIELD = "trainable_token_indices"
#: the reference's ``TrainableTokensWrapper`` child holding the rows: the checkpoint keys go through it
TOKEN_ADAPTER = "token_adapter."


class TokenAdapterLayer(TrainableTokensLayer):
    """TrainableTokens rows of a LoRA adapter (``trainable_token_indices``), saved under the reference's keys:
    ``token_adapter.trainable_tokens_delta``; a tied layer saves nothing. Mixed batches (``adapter_names=``) run each
    row group with its adapter's rows (``"__base__"`` rows and adapters without rows here: the base weight)."""

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        if self.tied_adapter is not None:
            return {}
        return {TOKEN_ADAPTER + key: value for key, value in super().adapter_state(adapter_name).items()}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Embedding: ``x: (N, ...) int -> (N, ..., dim)``; tied linear: ``x: (N, ..., in) -> (N, ..., out)``."""
        if self._row_adapters is not None and not self._disable_adapters:
            return self._mixed_forward(x)
        return super().forward(x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each group of rows of ``x: (N, ...)`` with its adapter's rows (the base weight for the others)."""
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(expand_rows(self._row_adapters or (), x.shape[0])):
            groups.setdefault(name if self.has_adapter(name) else "", []).append(row)
        out: torch.Tensor | None = None
        for name, rows in groups.items():
            weight = self.get_merged_weights([name] if name else [])
            if len(groups) == 1:
                return self._forward_with(x, weight)
            index = torch.tensor(rows, device=x.device)
            part = self._forward_with(x.index_select(0, index), weight)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, index, part)
        assert out is not None
        return out


@dataclass
class TokenPlan:
    """What ``trainable_token_indices`` asks of a model: ``wrap`` = ``(module name, token indices)`` of the modules
    getting rows of their own; ``tie``: the modules in ``tied_names`` (sharing the input embedding's weight) follow
    the input embedding's rows."""

    wrap: list[tuple[str, list[int]]] = field(default_factory=list)
    tie: bool = False
    tied_names: list[str] = field(default_factory=list)


def _base(module: nn.Module) -> nn.Module:
    """The module an adapter layer or ``modules_to_save`` wrapper wraps (``module`` itself otherwise)."""
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def _tied_module_names(model: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Names of the linear modules sharing the input embedding's weight, when the model ties its embeddings."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    if embedding is None or not ties_embeddings(model):
        return []
    weight = _base(embedding).weight
    return [name for name, module in modules
            if module is not embedding and isinstance(_base(module), nn.Linear) and _base(module).weight is weight]


def _targets(model: nn.Module, indices: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """``{module name or suffix: indices}``; the list form names the input embedding (else ``embed_tokens``)."""
    if isinstance(indices, dict):
        return {key: list(value) for key, value in indices.items()}
    return {input_embedding_name(model) or "embed_tokens": list(indices)}


def _matches(key: str, modules: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The modules called ``key`` or ending with ``"." + key``; :class:`NoMatchingPeftModuleError` when none."""
    hits = [(name, module) for name, module in modules if name == key or name.endswith("." + key)]
    if not hits:
        names = [name for name, _ in modules]
        raise NoMatchingPeftModuleError(f"{FIELD} names module {key!r}, which matches no module of the model; "
                                        f"closest names: {', '.join(closest_names(key, names)) or '-'}")
    return hits


def _check_target(name: str, module: nn.Module, indices: list[int], adapter_name: str | None = None) -> None:
    """``module`` can hold rows ``indices``: an embedding or linear layer (or this method's untied layer), with
    every index below its number of rows."""
    if isinstance(module, ModulesToSaveWrapper):
        raise ConfigError(FIELD, {name: indices}, f"module {name!r} is in modules_to_save (or tied to a module that "
                          "is), which trains it fully; allowed: modules_to_save or trainable_token_indices, not both")
    if isinstance(module, AdapterLayer) and not (isinstance(module, TokenAdapterLayer) and module.tied_adapter is None):
        if isinstance(module, TokenAdapterLayer):
            raise ConfigError(FIELD, {name: indices}, f"module {name!r} is tied to the input embedding's rows; "
                              "allowed: the same rows as the embedding (or leave the module out)")
        raise UnsupportedModuleError(f"{FIELD} cannot be applied to module {name!r}: it already holds an adapter "
                                     f"layer ({type(module).__name__}); allowed: modules that no other adapter layer "
                                     "wraps (remove it from target_modules, or from trainable_token_indices)")
    base = _base(module)
    if not isinstance(base, (nn.Embedding, nn.Linear)):
        raise UnsupportedModuleError(f"{FIELD} names module {name!r}, a {type(base).__name__}; allowed: nn.Embedding "
                                     "(or an nn.Linear such as the output head)")
    rows = base.weight.shape[0]
    bad = [i for i in indices if i >= rows]
    check(not bad, FIELD, {name: indices}, f"allowed: indices below the {rows} rows of {name!r}; out of range: {bad}")


def plan_token_layers(model: nn.Module, config: PeftConfig) -> TokenPlan:
    """Resolve ``config.trainable_token_indices`` against ``model`` (pure), with the reference's rules for tied
    embeddings (``peft.utils.other.set_additional_trainable_modules``).

    Raises:
        ConfigError: a named module is also in ``modules_to_save`` (or has a copy there), follows the embedding's rows
            (tied), or has fewer rows than an index; tied modules given different rows with
            ``ensure_weight_tying=True``.
        NoMatchingPeftModuleError: a name matches no module.
        UnsupportedModuleError: a named module is neither an embedding nor a linear layer, or already holds an
            adapter layer of another kind (a LoRA layer; the reference raises a ``TypeError`` there too).
    """
    indices = getattr(config, FIELD, None)
    if indices is None:
        return TokenPlan()
    targets = _targets(model, indices)
    saved = getattr(config, "modules_to_save", None) or []
    for key in targets:
        check(key not in saved, FIELD, indices, f"module {key!r} is also in modules_to_save, which trains it fully; "
              f"allowed: modules_to_save=[..., {key!r}, ...] or trainable_token_indices={{{key!r}: [...]}}, not both")
    modules = list(candidate_modules(model))
    tied_names = _tied_module_names(model, modules)
    mismatch, skip = _tied_rows(model, config, targets, tied_names)
    plan = TokenPlan(tied_names=tied_names)
    for key, rows in targets.items():
        if key in skip:
            continue
        for name, module in _matches(key, modules):
            _check_target(name, module, rows)
            plan.wrap.append((name, rows))
    embedding = input_embedding_name(model)
    plan.tie = bool(tied_names) and any(name == embedding for name, _ in plan.wrap) and (
        bool(getattr(config, "ensure_weight_tying", False)) or not mismatch)
    return plan


def _tied_rows(model: nn.Module, config: PeftConfig, targets: dict[str, list[int]],
               tied_names: list[str]) -> tuple[bool, set[str]]:
    """``(mismatch, skip)``: whether the targets that are tied modules (the input embedding included) ask for
    different rows, and the targets left to the tying because they ask for the same rows (the reference's rule:
    only for several targets of which at least two are tied, matched by plain suffix)."""
    if len(targets) < 2 or not tied_names:
        return False, set()
    embedding = input_embedding_name(model) or ""
    keys = [key for key in targets if embedding.endswith(key)
            or any(t.endswith(key) or key in t.split(".") for t in tied_names)]
    if len(keys) < 2:
        return False, set()
    mismatch = any(targets[key] != targets[keys[0]] for key in keys[1:])
    if mismatch and getattr(config, "ensure_weight_tying", False):
        shown = {key: targets[key] for key in keys}
        raise ConfigError("ensure_weight_tying", True, f"Cannot ensure weight tying when different token indices are "
                          f"specified for tied layers ({FIELD} {shown}); allowed: the same indices for all tied "
                          "layers, or ensure_weight_tying=False (each then trains its own rows)")
    return mismatch, (set() if mismatch else set(keys) & set(tied_names))


def check_trainable_tokens(config: PeftConfig, model: nn.Module) -> None:
    """Validate ``trainable_token_indices`` and ``ensure_weight_tying`` against ``model`` before anything is injected.

    ``ensure_weight_tying`` on a model that does not tie its embeddings warns (as the reference). On a tied model,
    peftkit ties trainable token rows, ``modules_to_save`` copies and LoRA layers (:mod:`.tied`) of the tied modules;
    :func:`.tied.check_tied_targets` refuses the combinations it does not implement.
    """
    if getattr(config, "ensure_weight_tying", False):
        if not ties_embeddings(model):
            warnings.warn("ensure_weight_tying=True but the model does not tie its input and output embeddings "
                          "(tie_word_embeddings=False): there is nothing to tie", PeftWarning, stacklevel=6)
        else:
            check_tied_targets(config, model)
    plan_token_layers(model, config)


def tie_saved_copies(model: nn.Module, config: PeftConfig, adapter_name: str, applied: AppliedPlan) -> None:
    """``ensure_weight_tying`` with ``modules_to_save`` selecting the input embedding or a module tied to it (as the
    reference): the embedding gets a trainable copy, and every tied module a copy sharing that copy's weight, so
    training, saving (under each module's keys) and ``merge_and_unload`` keep them tied."""
    if not (getattr(config, "ensure_weight_tying", False) and ties_embeddings(model)):
        return
    embedding_name = input_embedding_name(model)
    tied = _tied_module_names(model, list(candidate_modules(model)))
    selector = getattr(config, "modules_to_save", None)
    if embedding_name is None or not tied or not any(matches(selector, n) for n in (embedding_name, *tied)):
        return
    embedding = model.get_submodule(embedding_name)
    if not (isinstance(embedding, ModulesToSaveWrapper) and embedding.has_adapter(adapter_name)):
        _save_copy(model, embedding_name, embedding, adapter_name, None, applied)
    source = model.get_submodule(embedding_name).modules_to_save[adapter_name]
    for name in tied:
        module = model.get_submodule(name)
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        # a copy of the head whose weight is the embedding copy's (the other tensors copied, e.g. a bias)
        shared = copy.deepcopy(original, memo={id(original.weight): source.weight})
        _save_copy(model, name, module, adapter_name, shared, applied)


def _save_copy(model: nn.Module, name: str, module: nn.Module, adapter_name: str, copy_: nn.Module | None,
               applied: AppliedPlan) -> None:
    """Give ``module`` (at ``name``) the ``modules_to_save`` copy ``copy_`` (None: a deep copy) of ``adapter_name``."""
    applied.touched.append(name)
    if isinstance(module, ModulesToSaveWrapper):
        module.update(adapter_name, copy_)
        return
    wrapper = ModulesToSaveWrapper(module, adapter_name, copy_)
    wrapper.train(module.training)
    set_submodule(model, name, wrapper)
    applied.replaced.setdefault(name, module)


def add_token_layers(model: nn.Module, config: PeftConfig, adapter_name: str, applied: AppliedPlan,
                     autocast_adapter_dtype: bool = True) -> None:
    """``MethodSpec.extra_layers`` of LoRA: tie the LoRA layers of tied embeddings (:func:`.tied.bind_tied_layers`)
    and ``modules_to_save`` copies of them (:func:`tie_saved_copies`), then add the rows of ``trainable_token_indices`` for ``adapter_name`` (after the LoRA
    layers, as the reference), recording every module changed in ``applied``."""
    bind_tied_layers(model, config, adapter_name, applied)
    tie_saved_copies(model, config, adapter_name, applied)
    plan = plan_token_layers(model, config)  # again: the LoRA layers of this adapter exist now
    for name, rows in plan.wrap:
        module = model.get_submodule(name)
        layer = module if isinstance(module, TokenAdapterLayer) else TokenAdapterLayer(module)
        dtype = adapter_dtype(_base(module), autocast_adapter_dtype)
        layer.update_layer(adapter_name, rows, init_weights=True, dtype=dtype)
        _place(model, name, module, layer, applied)
    if not plan.tie:
        return
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, TokenAdapterLayer)
    for name in plan.tied_names:
        module = model.get_submodule(name)
        if isinstance(module, TokenAdapterLayer) and module.tied_adapter is embedding:
            module.update_layer(adapter_name, [])  # follows the embedding's dicts: refreshes only
            _place(model, name, module, module, applied)
        elif isinstance(module, TokenAdapterLayer) and module.has_adapter(adapter_name):
            continue  # given rows of its own above (named by a suffix the reference does not tie)
        elif isinstance(module, AdapterLayer):  # the reference nests the tied rows inside such a layer
            raise UnsupportedModuleError(f"module {name!r} shares the input embedding's weight (tie_word_embeddings), "
                                         f"whose rows {FIELD} trains, but already holds an adapter layer "
                                         f"({type(module).__name__}), which peftkit cannot combine with the tied rows; "
                                         "allowed: leave it out of target_modules")
        else:
            _place(model, name, module, TokenAdapterLayer(module, tied_adapter=embedding), applied)


def _place(model: nn.Module, name: str, module: nn.Module, layer: TokenAdapterLayer, applied: AppliedPlan) -> None:
    """Put ``layer`` at ``name`` (in ``module``'s train/eval mode) and record it in ``applied``."""
    applied.touched.append(name)
    if layer is not module:
        layer.train(_base(module).training)
        set_submodule(model, name, layer)
        applied.replaced.setdefault(name, module)
