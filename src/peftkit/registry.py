"""The method registry: one :class:`MethodSpec` per adapter method.

Everything generic (injection, serialization, the conformance tests) asks the registry instead of branching on
``peft_type``. A method registers itself from ``methods/<name>/__init__.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .types import PeftType

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import PeftConfig

# Built-in methods, imported on first registry access so that `import peftkit` stays cheap.
_BUILTIN_METHOD_MODULES: tuple[str, ...] = (
    "peftkit.methods.lora",
    "peftkit.methods.prompt_tuning",
    "peftkit.methods.p_tuning",
    "peftkit.methods.prefix_tuning",
    "peftkit.methods.ia3",
    "peftkit.methods.loha",
    "peftkit.methods.lokr",
    "peftkit.methods.adalora",
    "peftkit.methods.trainable_tokens",
    "peftkit.methods.oft",
    "peftkit.methods.boft",
    "peftkit.methods.hra",
    "peftkit.methods.miss",
    "peftkit.methods.road",
    "peftkit.methods.psoft",
    "peftkit.methods.osf",
    "peftkit.methods.ln_tuning",
    "peftkit.methods.vera",
    "peftkit.methods.fourierft",
    "peftkit.methods.vblora",
    "peftkit.methods.randlora",
    "peftkit.methods.shira",
    "peftkit.methods.c3a",
    "peftkit.methods.delora",
    "peftkit.methods.hira",
    "peftkit.methods.gralora",
    "peftkit.methods.waveft",
    "peftkit.methods.lily",
    "peftkit.methods.glora",
    "peftkit.methods.pvera",
    "peftkit.methods.tinylora",
    "peftkit.methods.unilora",
)


@dataclass(frozen=True)
class MethodSpec:
    """What the generic machinery needs to know about one adapter method.

    Attributes:
        peft_type: the ``PeftType`` written to ``adapter_config.json``.
        prefix: the prefix of every adapter parameter name (``"lora_"``): used to freeze/unfreeze.
        config_cls: the config dataclass.
        tuner_name: class name reported as the tuner (``"LoraModel"``), e.g. by ``get_model_status``.
        create_layer: ``(module, options, config, adapter_name, dtype) -> AdapterLayer``: wraps a base module, or
            adds the adapter to ``module`` when it already is one of this method's layers and returns it.
        layer_options: ``(module_name, module, config) -> dict`` of per-layer facts stored in the plan
            (rank, alpha, fan_in_fan_out, ...). Pure; raises ``UnsupportedModuleError`` for module types the
            method cannot wrap.
        default_targets: ``(model_type) -> target_modules or None``: the default table.
        check_config: ``(config, model) -> None``; raises for features the method does not support on this model.
        identity_at_init: whether a freshly initialised default adapter leaves outputs unchanged.
        mergeable: whether adapters of this method can be merged into the base weights.
        example_configs: keyword sets for ``config_cls`` used by the conformance suite; ``target_modules`` is
            filled in by the suite for each model.
        non_identity_kwargs: keyword arguments making a fresh adapter non-identity, so tests can observe it.
        combine: ``(tuner, adapters, weights, adapter_name, **options) -> None``: adds an adapter combining existing
            ones (``add_weighted_adapter``); None when the method cannot combine adapters.
        kind: ``"adapter"`` (layers injected into the model, ``TunerModel``) or ``"prompt"`` (virtual tokens routed
            into the inputs, ``PromptTuner``; ``create_layer`` / ``layer_options`` / ``default_targets`` unused).
        prompt_encoder: prompt methods: ``(resolved config, word_embeddings or None) -> VirtualTokenEncoder``.
        prompt_routing: prompt methods: ``"embeddings"`` (prepended to the input embeddings) or ``"prefix"``
            (key/value prefix in every attention layer's cache).
        supported_kinds: adapter methods: the module kinds of ``layers.dispatch.module_kind`` the method can wrap
            (``"linear"``, ``"hf_conv1d"``, ``"embedding"``, ``"conv"``); None: all of them.
        resolve_config: ``(config, model) -> {field: value}``: model-dependent config values (IA3's default
            ``feedforward_modules``) used while planning and recorded in the stored copy; None: nothing to resolve.
        additive: whether several active adapters add their updates (False for IA3, which multiplies its vectors).
        convert_for_save: ``(config, tensors, initial_path) -> (config, tensors)``: what ``save_pretrained(
            path_initial_model_for_weight_conversion=initial_path)`` writes instead of ``config`` / ``tensors``
            (LoRA: PiSSA/OLoRA -> plain LoRA); None: the method does not support that conversion.
        tuner_mixin: a class mixed into the method's named tuner class (extra tuner methods such as AdaLoRA's
            ``update_and_allocate``); None: the generic tuner only.
        loss_term: ``(tuner) -> tensor or None``: a term the tuner's forward adds to ``outputs.loss`` when the model
            returns a loss (AdaLoRA's orthogonality regulariser); None: nothing added.
        export_state: ``(model, config, adapter_name, tensors) -> tensors``: applied by ``get_peft_model_state_dict``
            to the checkpoint tensors (keys relative to ``model``), e.g. AdaLoRA's slicing by ``rank_pattern``.
        handles_tied_embeddings: the method adapts both modules of tied input/output embeddings itself (TrainableTokens'
            tied layers), so targeting one of them does not warn; or ``(config) -> bool`` when that depends on the
            config (LoRA's ``ensure_weight_tying``).
        rank_field: the config field that sets the rank of new layers (AdaLoRA: ``init_r``; its ``r`` is unused).
        pattern_fields: config fields holding ``{module-name regex: value}`` per-layer overrides; a key matching no
            targeted module warns (AdaLoRA's ``rank_pattern`` is a record of surviving ranks, not such a field).
        prepare_load: ``(model, config, adapter_name) -> None``: called by ``set_peft_model_state_dict`` before the
            shapes are checked, with the model's stored config (AdaLoRA resizes its layers by ``rank_pattern``).
        check_plan: ``(config, [(module_name, module), ...]) -> None``: called once with every module the plan
            wraps, to warn about per-layer facts that are likely a mistake (LoRA: ``lora_bias=True`` on layers
            without a bias), one warning naming all of them; None: nothing to check.
        init_changes_base: ``(config) -> bool``: whether initialising an adapter of ``config`` rewrites the base
            weights (LoRA's PiSSA / OLoRA): such an adapter should not sit beside others.
        parameter_options: ``(module name, module, parameter name, config) -> options`` for a parameter selected by
            ``target_parameters`` (passed to ``create_layer`` like ``layer_options``'); None: the method cannot
            adapt parameters.
        convert_checkpoint: ``(model, checkpoint, adapter_name) -> checkpoint``: translate tensors written for
            another layout before a load matches them (LoRA: transformers-4 per-expert keys of MoE models).
        init_allocates: ``(config) -> bool``: whether injecting an adapter of ``config`` for a load still allocates
            and fills its tensors although the checkpoint overwrites them (PiSSA / OLoRA change the base, DoRA
            computes its magnitude from the factors): loads then check the checkpoint on a meta probe first.
        mixed_compatible: adapters of the method may share a model with adapters of other methods
            (``PeftMixedModel``, ``get_peft_model(..., mixed=True)``; the reference's ``COMPATIBLE_TUNER_TYPES``).
        layer_cls: the class every adapter layer of the method derives from. Planning refuses a target that already
            is an adapter layer of another class, except in a mixed model, where the new layer wraps it (nests);
            None: no such check.
        prepare_model: ``(model, config) -> undo or None``: changes the model's structure before an adapter of
            ``config`` is planned (LoRA's ``layer_replication``); returns a function undoing the change (called when
            the injection or load fails), or None when nothing changed (e.g. already prepared: must be idempotent).
        check_merge: ``(model, config) -> None``: raises :class:`MergeError` when the adapters on ``model`` cannot
            be merged because of ``config`` or what ``prepare_model`` did (replicated layers share base weights).
        extra_layers: ``(model, config, adapter_name, applied, autocast_adapter_dtype) -> None``: called by
            ``apply_plan`` after the planned layers and ``modules_to_save``, to add the layers of another kind that
            ``config`` asks for under the same adapter name (LoRA's ``trainable_token_indices``); it records every
            module it changes in ``applied`` (``touched`` / ``replaced``), so a failure rolls it back. None: none.
        example_kinds: ``(example kwargs) -> (field, kinds)`` or None: an example config whose option ``field``
            applies to the module kinds ``kinds`` only (LoRA's variants: linear layers); the conformance suite runs
            it on the model cases of those kinds and checks that the others refuse it with a ConfigError naming
            ``field``. None (the default): the example runs wherever the method does (``supported_kinds``).
        example_changes_base: ``(example kwargs) -> bool``: creating an adapter of this example rewrites what the
            base model computes (LoRA's KaSA truncates the base weights), so the conformance suite's "base output"
            for it is the wrapped model's output inside ``disable_adapter()``, not the original model's.
        update_strength: ``(params, adapter_config dict) -> (shape, rank, strength, effective rank)``: how ``peftkit
            inspect`` measures one adapted module from the saved tensors alone (``params``: its tensors by name
            without the adapter name, e.g. ``{"road_theta": ..., "road_alpha": ...}``); None: inspect's built-in
            rules (LoRA, AdaLoRA, LoHa, LoKr: ``‖ΔW‖_F``; IA3: distance of the vector from 1).
        shared_state: ``(tuner, config, adapter_name, layers) -> None``: called after injection to create the tensors
            the adapter shares across all its layers (VB-LoRA's vector bank) once, in a ``layers.shared.
            SharedAdapterTensors`` attribute of the tuner (saved under that attribute's path without the adapter name,
            e.g. ``base_model.vblora_vector_bank``), and hand it to ``layers`` (the layers now holding the adapter).
            The tuner drops the adapter's entry on delete and rollback. None: no shared tensors.
        plan_options: ``(config, [(module_name, module, options), ...]) -> [options, ...]``: the per-layer options
            once every planned module is known, for options that depend on all of them (WaveFT's
            ``proportional_parameters``); called once after ``layer_options``. None: the options stay as computed.
    """

    peft_type: PeftType
    prefix: str
    config_cls: type[PeftConfig]
    tuner_name: str
    create_layer: Callable[[nn.Module, dict[str, Any], PeftConfig, str, torch.dtype], nn.Module]
    layer_options: Callable[[str, nn.Module, PeftConfig], dict[str, Any]]
    default_targets: Callable[[str | None], Any]
    check_config: Callable[[PeftConfig, nn.Module], None] = lambda config, model: None
    identity_at_init: bool = True
    mergeable: bool = True
    example_configs: Sequence[dict[str, Any]] = field(default_factory=tuple)
    non_identity_kwargs: dict[str, Any] = field(default_factory=dict)
    combine: Callable[..., None] | None = None
    kind: str = "adapter"
    prompt_encoder: Callable[[PeftConfig, nn.Module | None], nn.Module] | None = None
    prompt_routing: str | None = None
    resolve_config: Callable[[PeftConfig, nn.Module], dict[str, Any]] | None = None
    additive: bool = True
    supported_kinds: tuple[str, ...] | None = None
    convert_for_save: Callable[[PeftConfig, dict[str, torch.Tensor], str],
                               tuple[PeftConfig, dict[str, torch.Tensor]]] | None = None
    tuner_mixin: type | None = None
    loss_term: Callable[[nn.Module], torch.Tensor | None] | None = None
    export_state: Callable[[nn.Module, PeftConfig, str, dict[str, torch.Tensor]],
                           dict[str, torch.Tensor]] | None = None
    prepare_load: Callable[[nn.Module, PeftConfig, str], None] | None = None
    check_plan: Callable[[PeftConfig, Sequence[tuple[str, nn.Module]]], None] | None = None
    init_changes_base: Callable[[PeftConfig], bool] = lambda config: False
    init_allocates: Callable[[PeftConfig], bool] = lambda config: False
    parameter_options: Callable[[str, nn.Module, str, PeftConfig], dict[str, Any]] | None = None
    convert_checkpoint: Callable[[nn.Module, dict[str, torch.Tensor], str], dict[str, torch.Tensor]] | None = None
    rank_field: str = "r"
    pattern_fields: tuple[str, ...] = ("rank_pattern", "alpha_pattern")
    handles_tied_embeddings: bool | Callable[[PeftConfig], bool] = False
    mixed_compatible: bool = False
    layer_cls: type | None = None
    prepare_model: Callable[[nn.Module, PeftConfig], Callable[[], None] | None] | None = None
    check_merge: Callable[[nn.Module, PeftConfig], None] | None = None
    extra_layers: Callable[[nn.Module, PeftConfig, str, Any, bool], None] | None = None
    example_kinds: Callable[[dict[str, Any]], tuple[str, tuple[str, ...]] | None] = lambda kwargs: None
    example_changes_base: Callable[[dict[str, Any]], bool] = lambda kwargs: False
    update_strength: Callable[[dict[str, torch.Tensor], dict[str, Any]],
                              tuple[list[int], int | None, float, float | None]] | None = None
    shared_state: Callable[[nn.Module, PeftConfig, str, list[nn.Module]], None] | None = None
    plan_options: Callable[[PeftConfig, list[tuple[str, nn.Module, dict[str, Any]]]], list[dict[str, Any]]] | None = None


_REGISTRY: dict[PeftType, MethodSpec] = {}
_loaded = False


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register ``spec``; a second registration of the same ``peft_type`` is an error."""
    if spec.peft_type in _REGISTRY and _REGISTRY[spec.peft_type] is not spec:
        raise ValueError(f"a method is already registered for peft_type {spec.peft_type!s}")
    _REGISTRY[spec.peft_type] = spec
    return spec


def _ensure_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_METHOD_MODULES:
            importlib.import_module(module)


def get_method(peft_type: PeftType | str) -> MethodSpec:
    """The spec registered for ``peft_type`` (a ``PeftType`` or its string value)."""
    _ensure_builtins()
    try:
        key = PeftType(peft_type)
    except ValueError:
        key = None
    if key not in _REGISTRY:
        allowed = sorted(str(k) for k in _REGISTRY)
        raise ConfigError("peft_type", str(peft_type), f"peftkit implements: {allowed}")
    return _REGISTRY[key]


def all_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    _ensure_builtins()
    return list(_REGISTRY.values())
