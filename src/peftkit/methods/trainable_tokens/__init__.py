"""TrainableTokens: registration of the method with the registry, and the tied-embedding step of its tuner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...config import PeftConfig, check
from ...errors import UnsupportedModuleError
from ...layers.dispatch import EMBEDDING, module_kind
from ...registry import MethodSpec, register_method
from ...types import PeftType
from .config import TrainableTokensConfig, check_token_indices
from .layers import TrainableTokensLayer

if TYPE_CHECKING:
    from ...injection.apply import AppliedPlan


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Checks that ``module`` is an embedding (or already this method's layer) holding every token index."""
    assert isinstance(config, TrainableTokensConfig)
    if module_kind(module) != EMBEDDING or (hasattr(module, "adapter_layer_names")
                                             and not isinstance(module, TrainableTokensLayer)):
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(module).__name__}; TrainableTokens targets nn.Embedding (the output "
            "embedding follows a tied input embedding by itself). Adjust target_modules."
        )
    rows = module.weight.shape[0]
    bad = [i for i in config.token_indices if i >= rows]
    check(not bad, "token_indices", config.token_indices,
          f"allowed: indices below the {rows} rows of {name!r}; out of range: {bad}")
    return {"kind": EMBEDDING}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> TrainableTokensLayer:
    assert isinstance(config, TrainableTokensConfig)
    layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
    # ``dtype``: float32 on a half-precision base with autocast_adapter_dtype (as the reference casts its rows)
    layer.update_layer(adapter_name, config.token_indices, init_weights=config.init_weights, dtype=dtype)
    return layer


def _input_embedding_name(model: nn.Module) -> str | None:
    """The full name of ``model.get_input_embeddings()`` (None when the model has none)."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is None:
        return None
    return next((n for n, m in model.named_modules() if m is embedding and n), None)


def _resolve_config(config: PeftConfig, model: nn.Module) -> dict[str, Any]:
    """``target_modules=None`` → the input embedding's full name, else ``"embed_tokens"`` (the reference's rule;
    recorded in the stored config as the reference does)."""
    if config.target_modules is not None:
        return {}
    return {"target_modules": _input_embedding_name(model) or "embed_tokens"}


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


class TrainableTokensTunerMixin:
    """``TrainableTokensModel``: after injecting, every module that shares the weight of an adapted input embedding
    (the output embedding of a model with ``tie_word_embeddings``) gets a tied :class:`TrainableTokensLayer`."""

    model: nn.Module
    targeted_module_names: list[str]

    def inject_adapter(self, config: PeftConfig, adapter_name: str, autocast_adapter_dtype: bool = True
                       ) -> AppliedPlan:
        applied: AppliedPlan = super().inject_adapter(  # type: ignore[misc]
            config, adapter_name, autocast_adapter_dtype)
        try:
            tied = self._tie_to_embedding(applied)
        except BaseException:
            self.remove_injected(applied)  # type: ignore[attr-defined]
            raise
        if tied:
            self.targeted_module_names = sorted({*self.targeted_module_names, *tied})
            self._refresh_trainability()  # type: ignore[attr-defined]
        return applied

    def _tie_to_embedding(self, applied: AppliedPlan) -> list[str]:
        """Wrap the modules tied to the adapted input embedding; returns their names (recorded in ``applied``)."""
        embedding = getattr(self.model, "get_input_embeddings", lambda: None)()
        if not isinstance(embedding, TrainableTokensLayer) or not _ties_embeddings(self.model):
            return []
        weight = embedding.get_base_layer().weight
        names: list[str] = []
        wrapped: list[str] = []  # prefixes of adapter wrappers: their internals (``base_layer``) are not targets
        for name, module in self.model.named_modules(remove_duplicate=False):
            if not name or any(name.startswith(prefix) for prefix in wrapped):
                continue
            if isinstance(module, TrainableTokensLayer):
                wrapped.append(name + ".")
                continue
            if not isinstance(module, nn.Linear) or module.weight is not weight:
                continue
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, TrainableTokensLayer(module, tied_adapter=embedding))
            applied.touched.append(name)
            applied.replaced.setdefault(name, module)
            names.append(name)
        return names


TRAINABLE_TOKENS = register_method(
    MethodSpec(
        peft_type=PeftType.TRAINABLE_TOKENS,
        prefix="trainable_tokens_",
        config_cls=TrainableTokensConfig,
        tuner_name="TrainableTokensModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=lambda model_type: None,
        identity_at_init=True,
        mergeable=True,
        example_configs=({"token_indices": [3, 30, 61]},),  # tokens the conformance inputs contain
        additive=False,  # adapters replace rows: overlapping ones conflict, disjoint ones combine
        non_identity_kwargs={"init_weights": False},
        resolve_config=_resolve_config,
        supported_kinds=(EMBEDDING,),
        tuner_mixin=TrainableTokensTunerMixin,
        pattern_fields=(),
        handles_tied_embeddings=True,
    )
)

__all__ = ["TRAINABLE_TOKENS", "TrainableTokensConfig", "TrainableTokensLayer", "check_token_indices"]
