"""LoRA: registration of the method with the registry."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, PeftWarning, UnsupportedModuleError
from ...injection.match import pattern_value
from ...layers.dispatch import CONV, EMBEDDING, HF_CONV1D, LINEAR, MHA, QUANT_LINEAR, module_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .alora import ALoraTunerMixin
from .bdlora import bdlora_choice
from .combine import add_weighted_adapter
from .config import LoraConfig
from .convert import convert_initial_weights
from .init import (
    SUPPORTED_INITS,
    changes_base_weight,
    extra_init_kinds,
    is_supported_init,
    mark_frozen_weights,
    resolve_init,
    uses_base_weight,
)
from .kasa import KasaTunerMixin, check_kasa_mixing
from .layers import Conv, Embedding, Linear, LoraLayer
from .mha import MultiheadAttention, check_mha
from .monteclora import MontecloraTunerMixin, warn_quantized_targets
from .param import ParamLayer
from .quantized import QuantLinear
from .replication import check_merge, prepare_model
from .tied import convert_checkpoint, export_tied_keys, resolve_config
from .tokens import add_token_layers, check_trainable_tokens
from .variants import VARIANT_FIELDS

_LAYER_CLASSES: dict[str, type[LoraLayer]] = {LINEAR: Linear, HF_CONV1D: Linear, EMBEDDING: Embedding, CONV: Conv,
                                              QUANT_LINEAR: QuantLinear, MHA: MultiheadAttention}

#: config fields peftkit accepts (for file compatibility) but does not implement yet, with their inert values
_NOT_YET: dict[str, tuple[object, ...]] = {
    "megatron_config": (None,),
}


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind, rank and alpha after the patterns, and ``fan_in_fan_out`` (detected)."""
    assert isinstance(config, LoraConfig)
    custom = _custom_layer(module, config)
    if custom is not None:
        return _custom_options(name, module, custom, config)
    kind = module_kind(module)
    if kind is None:
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(module).__name__}; LoRA supports nn.Linear, nn.Embedding, "
            f"nn.Conv1d/2d/3d, nn.MultiheadAttention and transformers' Conv1D. Adjust target_modules."
        )
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    r = pattern_value(config.rank_pattern, name, config.r)
    if kind == CONV and base.groups != 1:
        _check_grouped_conv(name, base.groups, r, config)
    if kind == MHA:
        check_mha(name, base, config)
    if uses_base_weight(config.init_lora_weights) and kind not in (LINEAR, HF_CONV1D, *extra_init_kinds(config)):
        raise ConfigError("init_lora_weights", config.init_lora_weights,
                          f"PiSSA/OLoRA/LoftQ initialise nn.Linear and Conv1D layers only (MiCA also nn.Embedding); "
                          f"target {name!r} is a {type(base).__name__}. Exclude it from target_modules or use another "
                          "init")
    return {
        "kind": kind,
        "r": r,
        "lora_alpha": pattern_value(config.alpha_pattern, name, config.lora_alpha),
        "fan_in_fan_out": kind == HF_CONV1D,
        # BD-LoRA: which factor of this target is block-diagonal (only listed when use_bdlora is set)
        **({"use_bdlora": bdlora_choice(name, kind == LINEAR, getattr(base, "in_features", 0),
                                        getattr(base, "out_features", 0), r, config)} if config.use_bdlora else {}),
    }


def _check_grouped_conv(name: str, groups: int, r: int, config: LoraConfig) -> None:
    """As the reference's ``_ConvNd``: the rank must be divisible by ``groups`` (B is a grouped 1x1 conv); merging
    will be impossible (warned). DoRA is not implemented on grouped convolutions."""
    if r % groups:
        raise ConfigError("r", r, f"target {name!r} is a convolution with groups={groups}; LoRA on grouped "
                          f"convolutions needs a rank divisible by groups. Choose another rank (rank_pattern) or "
                          "do not target this layer")
    if config.use_dora:
        raise ConfigError("use_dora", True, f"target {name!r} is a convolution with groups={groups}; DoRA supports "
                          "groups=1 only. Exclude it from target_modules or set use_dora=False")
    warnings.warn(f"LoRA adapter added to {name!r}, a convolution with groups={groups}: merging is not supported.",
                  PeftWarning, stacklevel=6)


#: the layer kind of a parameter selected by ``target_parameters``
PARAM = "param"


def _parameter_options(name: str, module: nn.Module, parameter_name: str, config: PeftConfig) -> dict[str, Any]:
    """Per-parameter facts (rank and alpha after the patterns, keyed ``"<module>.<param>"``); the LoRA options
    that cannot apply to a parameter raise, as the reference's ``ParamWrapper`` does."""
    assert isinstance(config, LoraConfig)
    key = f"{name}.{parameter_name}"
    unsupported = (("lora_dropout", config.lora_dropout != 0, "0.0 (x cannot be factored out of B(A(dropout(x))))"),
                   ("use_dora", config.use_dora, "False"), ("lora_bias", config.lora_bias, "False"),
                   ("fan_in_fan_out", config.fan_in_fan_out, "False"),
                   ("init_lora_weights", not (isinstance(config.init_lora_weights, bool)
                                              or config.init_lora_weights == "gaussian"), "True, False or 'gaussian'"))
    for field_name, bad, allowed in unsupported:
        if bad:
            raise ConfigError(field_name, getattr(config, field_name),
                              f"LoRA on parameters (target_parameters, here {key!r}) does not support it; "
                              f"allowed: {allowed}")
    return {"kind": PARAM, "parameter_name": parameter_name,
            "r": pattern_value(config.rank_pattern, key, config.r),
            "lora_alpha": pattern_value(config.alpha_pattern, key, config.lora_alpha)}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> LoraLayer:
    assert isinstance(config, LoraConfig)
    if options["kind"] == PARAM:  # the chain's layer for this parameter, or a new one around the chain
        existing = module.find(options["parameter_name"]) if isinstance(module, ParamLayer) else None
        outer = module if existing is not None else ParamLayer(module, options["parameter_name"])
        _update(existing or outer, options, config, adapter_name, dtype)
        return outer
    if options["kind"] == CUSTOM and not isinstance(module, LoraLayer):
        return _create_custom(module, options, config, adapter_name, dtype)
    if isinstance(module, LoraLayer):
        _update(module, options, config, adapter_name, dtype)
        return module
    layer = _LAYER_CLASSES[options["kind"]](module, fan_in_fan_out=options["fan_in_fan_out"])
    try:
        _update(layer, options, config, adapter_name, dtype)
    except BaseException:
        unwrap = getattr(type(layer), "unwrap_base", None)  # puts back modules nested in the base (MHA's out_proj)
        if unwrap is not None:
            unwrap(layer)
        raise
    return layer


#: the layer kind of a module wrapped by a user's class (``LoraConfig._register_custom_module``)
CUSTOM = "custom"


def _custom_layer(module: nn.Module, config: LoraConfig) -> Callable[..., Any] | None:
    """The class registered for ``module``'s base layer type (the first matching key), or None, as the reference's
    dynamic dispatch (checked before every built-in kind)."""
    mapping = getattr(config, "_custom_modules", None)
    if not mapping:
        return None
    base = _base(module)
    return next((cls for key, cls in mapping.items() if isinstance(base, key)), None)


def _custom_options(name: str, module: nn.Module, custom: Callable[..., Any], config: LoraConfig) -> dict[str, Any]:
    """Options of a module wrapped by a user's class: the built-in layers' checks are theirs to make."""
    return {"kind": CUSTOM, "custom_cls": custom, "target_name": name,
            "r": pattern_value(config.rank_pattern, name, config.r),
            "lora_alpha": pattern_value(config.alpha_pattern, name, config.lora_alpha),
            "fan_in_fan_out": config.fan_in_fan_out}


def _create_custom(module: nn.Module, options: dict[str, Any], config: LoraConfig, adapter_name: str,
                   dtype: torch.dtype) -> LoraLayer:
    """Wrap ``module`` in the user's class: a peftkit ``LoraLayer`` subclass is built as the built-in layers are;
    any other callable is called the reference's way and must return a ``LoraLayer`` holding the adapter."""
    custom = options["custom_cls"]
    if isinstance(custom, type) and issubclass(custom, LoraLayer):
        layer = custom(module, fan_in_fan_out=options["fan_in_fan_out"])
        _update(layer, options, config, adapter_name, dtype)
        return layer
    layer = custom(module, adapter_name, config=config, r=options["r"], lora_alpha=options["lora_alpha"],
                   target_name=options["target_name"])
    if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
        raise TypeError(f"the custom LoRA layer registered for {type(_base(module)).__name__} ({custom!r}) returned "
                        f"a {type(layer).__name__} for target {options['target_name']!r}; allowed: a peftkit "
                        f"LoraLayer holding the adapter {adapter_name!r} (subclass peftkit.methods.lora.layers."
                        "Linear, or call update_layer in the factory)")
    return layer


def _update(layer: LoraLayer, options: dict[str, Any], config: LoraConfig, adapter_name: str,
            dtype: torch.dtype) -> None:
    layer.update_layer(
        adapter_name,
        r=options["r"],
        lora_alpha=options["lora_alpha"],
        lora_dropout=config.lora_dropout,
        init_lora_weights=resolve_init(config),
        use_rslora=config.use_rslora,
        lora_bias=config.lora_bias,
        dtype=dtype,
        # the fields selecting a variant (DoRA, ...); a per-layer value in the layer options wins (BD-LoRA's choice)
        **{name: options.get(name, getattr(config, name)) for name in VARIANT_FIELDS},
    )
    mark_frozen_weights(layer, adapter_name, config.init_lora_weights)  # MiCA trains lora_A only


def _check_config(config: PeftConfig, model: nn.Module) -> None:
    """Reject, with a clear message, the reference features peftkit does not implement yet."""
    assert isinstance(config, LoraConfig)
    for name, inert in _NOT_YET.items():
        value = getattr(config, name)
        if not any(value is v or value == v for v in inert):
            raise ConfigError(name, value, f"peftkit does not implement {name} yet; allowed: {inert[0]!r}")
    if not is_supported_init(config.init_lora_weights):
        raise ConfigError("init_lora_weights", config.init_lora_weights,
                          f"peftkit implements {list(SUPPORTED_INITS)} so far")
    check_trainable_tokens(config, model)  # trainable_token_indices / ensure_weight_tying against the model
    check_kasa_mixing(config.kasa_config, model)  # KaSA rewrites the base: KaSA adapters only, or none


def _check_plan(config: PeftConfig, planned: Sequence[tuple[str, nn.Module]]) -> None:
    """Warn (once, naming them) about targeted layers without a bias when ``lora_bias=True``: the reference warns
    per layer that merging is then impossible (``lora.layer.LoraLayer.update_layer``)."""
    assert isinstance(config, LoraConfig)
    warn_quantized_targets(config, planned)  # MonteCLoRA: quantized layers get plain LoRA, as the reference
    if not config.lora_bias:
        return
    no_bias = [name for name, module in planned if hasattr(_base(module), "bias") and _base(module).bias is None]
    if no_bias:
        more = " ..." if len(no_bias) > 5 else ""
        warnings.warn(f"lora_bias=True was passed but the targeted layers {no_bias[:5]}{more} have no bias, so the "
                      "LoRA bias cannot be merged into them (merge_and_unload would fail). Target layers with a "
                      "bias or set lora_bias=False.", PeftWarning, stacklevel=5)


#: the LoRA variants that adapt some module kinds only (``MethodSpec.example_kinds``): field -> kinds
_VARIANT_KINDS: dict[str, tuple[str, ...]] = {
    "monteclora_config": ("linear", "hf_conv1d"),
    "use_bdlora": ("linear",),
    "velora_config": ("linear", "hf_conv1d"),
    "kasa_config": ("linear",),
}


def _example_kinds(kwargs: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """``(field, kinds)`` of the first variant of :data:`_VARIANT_KINDS` an example config selects, or None."""
    chosen = (name for name in _VARIANT_KINDS if kwargs.get(name) is not None and kwargs.get(name) is not False)
    name = next(chosen, None)
    return None if name is None else (name, _VARIANT_KINDS[name])


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


LORA = register_method(
    MethodSpec(
        peft_type=PeftType.LORA,
        prefix="lora_",
        config_cls=LoraConfig,
        tuner_name="LoraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,
        check_config=_check_config,
        check_plan=_check_plan,
        identity_at_init=True,
        mergeable=True,
        example_configs=(
            {"r": 4, "lora_alpha": 8},
            {"r": 4, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.1},
            {"r": 2, "lora_alpha": 4, "init_lora_weights": "gaussian", "bias": "lora_only"},
            {"r": 4, "lora_alpha": 8, "bias": "all", "lora_bias": False},
            {"r": 4, "lora_alpha": 8, "use_dora": True, "lora_dropout": 0.1},
            {"r": 4, "lora_alpha": 8, "monteclora_config": {"num_samples": 2, "buffer_size": 1}},
            {"r": 4, "lora_alpha": 8, "use_bdlora": {"target_modules_bd_a": [""], "nblocks": 2}},  # every A
            {"r": 4, "lora_alpha": 8, "velora_config": {"num_groups": 3, "scale": 1.5}},
            {"r": 2, "lora_alpha": 4, "kasa_config": {"beta": 0.5, "gamma": 0.25}},
        ),
        example_kinds=_example_kinds,
        example_changes_base=lambda kwargs: kwargs.get("kasa_config") is not None,
        non_identity_kwargs={"init_lora_weights": False},
        combine=add_weighted_adapter,
        mixed_compatible=True,
        layer_cls=LoraLayer,
        convert_for_save=convert_initial_weights,
        init_changes_base=lambda config: changes_base_weight(getattr(config, "init_lora_weights", True)),
        parameter_options=_parameter_options,
        resolve_config=resolve_config,  # MoE conversion, then ensure_weight_tying's target_modules (tied.py)
        convert_checkpoint=convert_checkpoint,  # MoE v4 keys, then the tied layers' keys (tied.py)
        export_state=export_tied_keys,
        prepare_model=prepare_model,
        check_merge=check_merge,
        extra_layers=add_token_layers,
        handles_tied_embeddings=lambda config: bool(getattr(config, "ensure_weight_tying", False)),
        # aLoRA: forward / generate hand the invocation offsets to the layers; KaSA: _get_kasa_loss
        tuner_mixin=type("LoraTunerMixin", (ALoraTunerMixin, KasaTunerMixin, MontecloraTunerMixin), {}),
        init_allocates=lambda config: (uses_base_weight(getattr(config, "init_lora_weights", True))
                                       or bool(getattr(config, "use_dora", False))
                                       or getattr(config, "kasa_config", None) is not None),
    )
)

__all__ = ["LORA", "LoraConfig", "LoraLayer"]
