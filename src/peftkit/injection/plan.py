"""``plan_injection``: decide, without touching the model, which modules an adapter wraps and how.

The plan holds every per-layer fact (kind, rank, alpha, ``fan_in_fan_out``) so that configs are never rewritten.
It can be printed to show a user what a config will do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import PeftConfig
from ..errors import (
    ConfigError,
    NoMatchingPeftModuleError,
    PeftRuntimeWarning,
    PeftWarning,
    UnsupportedModuleError,
    closest_names,
)
from ..layers.base import AdapterLayer
from ..layers.dispatch import is_linear_like
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..module_utils import model_embedding, walk_modules
from ..registry import MethodSpec
from ..target_tables import DIRECT_WEIGHT_MODULES, MAMBA_FUSED_MODULES, MAMBA_MODEL_TYPES, NOT_LINEAR_CLASSES
from .match import ALL_LINEAR, in_layers, inside_any, matches

#: classification heads the reference adds to ``modules_to_save`` for SEQ_CLS / TOKEN_CLS, and QA's head
SEQ_CLS_HEADS = ("classifier", "score")
QA_HEADS = ("qa_outputs",)


@dataclass(frozen=True)
class LayerPlan:
    """One module to wrap: its dotted ``name`` and the per-layer ``options`` the method computed."""

    name: str
    options: dict[str, Any] = field(hash=False)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}: {opts}"


@dataclass(frozen=True)
class InjectionPlan:
    """Everything :func:`~peftkit.injection.apply.apply_plan` needs, and the resolved selectors for the config."""

    adapter_name: str
    layers: tuple[LayerPlan, ...]
    modules_to_save: tuple[str, ...]
    target_modules: set[str] | str
    modules_to_save_names: tuple[str, ...] | None
    #: model-dependent config values from ``MethodSpec.resolve_config`` (recorded in the stored config copy)
    config_fields: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"adapter {self.adapter_name!r}: {len(self.layers)} layers"]
        lines += [f"  {layer}" for layer in self.layers]
        lines += [f"  {name}: full trainable copy (modules_to_save)" for name in self.modules_to_save]
        return "\n".join(lines)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module an adapter could target: adapter wrappers count as the module they
    wrap, and their internals (``base_layer``, ``lora_A``, copies of ``modules_to_save``) are skipped."""
    skip: list[str] = []
    for name, module in walk_modules(model):
        if not name or any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            skip.append(name + ".")
        yield name, module


def plan_injection(
    model: nn.Module,
    config: PeftConfig,
    adapter_name: str,
    method: MethodSpec,
    task_heads: Sequence[str] = (),
    nest_methods: bool = False,
) -> InjectionPlan:
    """Resolve ``config`` against ``model`` into an :class:`InjectionPlan`. Pure: the model is not modified.

    ``nest_methods`` (mixed models): a target that already is an adapter layer of another method gets wrapped by
    this method's layer; otherwise it is refused.

    Raises:
        NoMatchingPeftModuleError: no module matches ``target_modules`` (the message lists the closest names), or
            every match was excluded, or a ``modules_to_save`` entry matches nothing.
        UnsupportedModuleError: a matched module has a type the method has no layer for, or (without
            ``nest_methods``) already is an adapter layer of another method.
    """
    method.check_config(config, model)
    config_fields = method.resolve_config(config, model) if method.resolve_config is not None else {}
    if config_fields:
        config = config.copy(**config_fields)
    modules = list(candidate_modules(model))
    targets = _resolve_targets(model, config, modules, method)
    save_entries = list(dict.fromkeys([*(getattr(config, "modules_to_save", None) or []), *task_heads]))
    layers, excluded, other_layers = [], 0, 0
    planned: list[tuple[str, nn.Module]] = []
    for name, module in modules:
        if not matches(targets, name):
            continue
        if matches(getattr(config, "exclude_modules", None), name) or (save_entries and inside_any(name, save_entries)):
            excluded += 1
            continue
        if not isinstance(targets, str) and not in_layers(
            name, getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None)
        ):
            other_layers += 1
            continue
        _refuse_unreachable(model, name, module)
        _refuse_other_method(name, module, method, nest_methods)
        layers.append(LayerPlan(name, method.layer_options(name, module, config)))
        planned.append((name, module))
    if method.plan_options is not None and layers:  # options that depend on every planned module
        options = method.plan_options(config, [(lp.name, m, lp.options) for lp, (_, m) in zip(layers, planned)])
        layers = [LayerPlan(lp.name, o) for lp, o in zip(layers, options)]
    parameter_layers = _plan_parameters(modules, config, method, {layer.name for layer in layers})
    if not layers and not parameter_layers:
        _raise_no_match(targets, config, modules, excluded, other_layers)
    pattern_names = [layer.name for layer in layers]
    pattern_names += [f"{layer.name}.{layer.options['parameter_name']}" for layer in parameter_layers]
    layers.extend(parameter_layers)
    _warn_unused_patterns(config, pattern_names, method.pattern_fields)
    _warn_unused_excludes(config, [name for name, _ in modules])
    _warn_fan_in_fan_out(config, layers)
    if method.check_plan is not None:
        method.check_plan(config, planned)
    saved = _resolve_modules_to_save(modules, save_entries, task_heads)
    handles_tied = method.handles_tied_embeddings
    if not (handles_tied(config) if callable(handles_tied) else handles_tied):
        _warn_tied_embeddings(model, planned, [(n, m) for n, m in modules if n in saved])
    return InjectionPlan(
        adapter_name=adapter_name,
        layers=tuple(layers),
        modules_to_save=tuple(saved),
        target_modules=targets,
        modules_to_save_names=tuple(save_entries) if save_entries else None,
        config_fields=config_fields,
    )


def _plan_parameters(modules: list[tuple[str, nn.Module]], config: PeftConfig, method: MethodSpec,
                     module_layers: set[str]) -> list[LayerPlan]:
    """One :class:`LayerPlan` per parameter that ``config.target_parameters`` selects (``"<module>.<param>"`` equal
    to an entry or ending with ``"." + entry``, as the reference; ``exclude_modules`` and ``layers_to_transform``
    do not apply to parameters there either), in each module's definition order: the first is wrapped first, so it
    ends up innermost. Raises for a module that is also a module target, or that already holds adapters on another
    set of parameters (the nesting, and so the checkpoint keys, would differ)."""
    targets = getattr(config, "target_parameters", None)
    if not targets:
        return []
    if method.parameter_options is None:
        raise ConfigError("target_parameters", targets, f"{method.peft_type} cannot adapt parameters; allowed: None")
    plans: list[LayerPlan] = []
    for name, module in modules:
        owner = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        hits = [p for p, _ in owner.named_parameters(recurse=False)
                if any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t) for t in targets)]
        if not hits:
            continue
        present = _parameter_chain(module)
        if name in module_layers or (isinstance(module, AdapterLayer) and present is None):
            raise ConfigError("target_parameters", sorted(targets), f"the parameters {hits} of {name!r} cannot be "
                              "adapted: the module itself is adapted (target_modules); allowed: parameters of "
                              "modules that target_modules does not select (e.g. target_modules=[])")
        if present and set(present) != set(hits):
            raise ConfigError("target_parameters", sorted(targets), f"{name!r} already holds adapters on its "
                              f"parameters {sorted(present)}, and this adapter targets {sorted(hits)}; all adapters "
                              "on a module's parameters must target the same ones (their checkpoint keys depend on it)")
        plans.extend(LayerPlan(name, method.parameter_options(name, module, p, config)) for p in hits)
    if not plans:
        warnings.warn(f"target_parameters={sorted(targets)} were set but no parameter was matched", PeftRuntimeWarning,
                      stacklevel=4)
    return plans


def _parameter_chain(module: nn.Module) -> list[str] | None:
    """The parameter names adapted by the wrappers around ``module`` (outermost first); [] for a plain module,
    None for an adapter layer that adapts the module itself."""
    names: list[str] = []
    while isinstance(module, AdapterLayer):
        parameter = getattr(module, "parameter_name", None)
        if parameter is None:
            return None
        names.append(parameter)
        module = module.base_layer
    return names


def plan_modules_to_save(
    model: nn.Module, config: PeftConfig, adapter_name: str, task_heads: Sequence[str] = ()
) -> InjectionPlan:
    """A plan that only wraps ``config.modules_to_save`` and ``task_heads`` (for methods without adapter layers, such
    as the prompt-learning ones). Pure; raises :class:`NoMatchingPeftModuleError` for an entry matching nothing."""
    save_entries = list(dict.fromkeys([*(getattr(config, "modules_to_save", None) or []), *task_heads]))
    saved = _resolve_modules_to_save(list(candidate_modules(model)), save_entries, task_heads)
    return InjectionPlan(
        adapter_name=adapter_name,
        layers=(),
        modules_to_save=tuple(saved),
        target_modules=set(),
        modules_to_save_names=tuple(save_entries) if save_entries else None,
    )


def _resolve_targets(
    model: nn.Module, config: PeftConfig, modules: list[tuple[str, nn.Module]], method: MethodSpec
) -> set[str] | str:
    targets = getattr(config, "target_modules", None)
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = method.default_targets(model_type)
        if targets is None:
            raise NoMatchingPeftModuleError(
                f"target_modules=None and there is no default for model_type {model_type!r} "
                f"({type(model).__name__}); pass target_modules explicitly, e.g. target_modules={_examples(modules)}"
            )
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return _all_linear(model, config, modules)
    return targets


def _all_linear(model: nn.Module, config: PeftConfig, modules: list[tuple[str, nn.Module]]) -> set[str]:
    """Full names of every linear layer except the output head (or the classification head for SEQ_CLS)."""
    names = {name for name, module in modules if is_linear_like(module) and _unreachable(model, name, module) is None}
    head = model_embedding(model, "get_output_embeddings")
    if head is None and str(config.task_type) == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if isinstance(getattr(model, n, None), nn.Module)), None)
    if head is not None:
        names -= {name for name, module in modules if module is head or getattr(module, "base_layer", None) is head}
    return names


def _unreachable(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why an adapter on ``module`` (at ``name``) could not work, or None: an ``nn.Linear`` subclass that is not a
    plain linear map (``target_tables.NOT_LINEAR_CLASSES``: tuple-returning MoE routers), or a weight that the
    model reads directly (``target_tables.DIRECT_WEIGHT_MODULES``). These
    are left out of ``all-linear`` and refused when named."""
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    if type(base).__name__ in NOT_LINEAR_CLASSES:
        return f"{type(base).__name__} subclasses nn.Linear but {NOT_LINEAR_CLASSES[type(base).__name__]}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if name.rsplit(".", 1)[-1] in DIRECT_WEIGHT_MODULES.get(model_type or "", ()):
        return f"model_type={model_type!r} reads its weight directly (weight @ x) without calling the module"
    return None


def _refuse_other_method(name: str, module: nn.Module, method: MethodSpec, nest_methods: bool) -> None:
    """Raise :class:`UnsupportedModuleError` when ``module`` already is an adapter layer of a method other than
    ``method`` (not of its ``MethodSpec.layer_cls``), unless ``nest_methods`` (a mixed model: the new layer wraps it,
    as the reference's ``MixedModel`` does)."""
    own = method.layer_cls
    if nest_methods or own is None or not isinstance(module, AdapterLayer) or isinstance(module, own):
        return
    raise UnsupportedModuleError(f"module {name!r} already holds adapters of another method "
                                 f"({type(module).__name__}); adapters of different types share a model only in a "
                                 "PeftMixedModel (get_peft_model(..., mixed=True))")


def _refuse_unreachable(model: nn.Module, name: str, module: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` for a targeted module an adapter cannot work on (:func:`_unreachable`),
    or an ``out_proj`` / ``conv1d`` of a Mamba model, whose fused CUDA kernel reads those weights directly (the
    reference's rule, ``ValueError``), so the adapter would be skipped on GPU."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reason = _unreachable(model, name, module)
    if reason is None and model_type in MAMBA_MODEL_TYPES and name.rsplit(".", 1)[-1] in MAMBA_FUSED_MODULES:
        reason = (f"it is incompatible with Mamba-based models (model_type={model_type!r}): the fused CUDA kernel "
                  f"reads the weights of {sorted(MAMBA_FUSED_MODULES)} directly, so an adapter would be skipped")
    if reason is not None:
        raise UnsupportedModuleError(f"Module {name!r} cannot be adapted: {reason}. Remove it from target_modules "
                                     "(all-linear leaves such modules out where it can)")


def _resolve_modules_to_save(
    modules: list[tuple[str, nn.Module]], entries: list[str], task_heads: Sequence[str]
) -> list[str]:
    """Names of the modules that get a trainable copy; an entry (other than a task head) must match something."""
    chosen: list[str] = []
    for entry in entries:
        hits = [name for name, _ in modules if matches([entry], name)]
        hits = [h for h in hits if not any(h.startswith(c + ".") for c in chosen)]
        if not hits and entry not in task_heads and entry not in SEQ_CLS_HEADS + QA_HEADS:
            raise NoMatchingPeftModuleError(
                f"modules_to_save entry {entry!r} matched no module; closest names: "
                f"{closest_names(entry, [n for n, _ in modules])}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    # keep outermost matches only: a module inside another saved module is saved with it
    chosen = [c for c in chosen if not any(c.startswith(o + ".") for o in chosen if o != c)]
    _warn_suffix_only(suffix_only_modules_to_save([n for n, _ in modules], entries, chosen), entries)
    return chosen


def suffix_only_modules_to_save(names: Sequence[str], entries: Sequence[str], chosen: Sequence[str]) -> list[str]:
    """The modules among ``names`` that the reference's plain-suffix rule (``name.endswith(entry)``, so
    ``"classifier"`` also selects DistilBERT's ``pre_classifier``) wraps for ``modules_to_save`` ``entries`` but
    peftkit's dot-boundary rule does not (``chosen`` are peftkit's picks); none inside a chosen module."""
    return [
        n for n in names
        if n not in chosen and any(n.endswith(e) for e in entries)
        and not any(n.startswith(c + ".") for c in chosen)
    ]


def _warn_suffix_only(extra: list[str], entries: Sequence[str]) -> None:
    if extra:
        warnings.warn(
            f"modules_to_save {list(entries)} matches {extra} only by plain suffix: 🤗 PEFT wraps (and trains and "
            "saves) those too, peftkit wraps only names equal to an entry or ending with '.' + entry. Name them in "
            "modules_to_save to train them; adapter files from PEFT that hold their weights still load (peftkit "
            "wraps them at load time)", PeftWarning, stacklevel=5)


def _raise_no_match(
    targets: object, config: PeftConfig, modules: list[tuple[str, nn.Module]], excluded: int, other_layers: int
) -> None:
    if other_layers:
        raise NoMatchingPeftModuleError(
            f"target_modules {_show(targets)} matched {other_layers} module(s), but none lies in "
            f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}); "
            "the layer index is the number after the layers_pattern segment (e.g. model.layers.3.self_attn.q_proj)"
        )
    if excluded:
        raise NoMatchingPeftModuleError(
            f"All modules were excluded: target_modules={_show(targets)} matched {excluded} module(s), but each is "
            f"excluded by exclude_modules={_show(getattr(config, 'exclude_modules', None))} or lies inside "
            f"modules_to_save"
        )
    names = [name for name, _ in modules]
    queries = [targets] if isinstance(targets, str) else sorted(targets)  # type: ignore[arg-type]
    close = list(dict.fromkeys(hit for q in queries for hit in closest_names(q, names)))
    raise NoMatchingPeftModuleError(
        f"target_modules {_show(targets)} matched no module; closest names: {', '.join(close) or '-'}. "
        f"Target modules {_show(targets)} not found in the base model."
    )


def _warn_unused_patterns(config: PeftConfig, names: list[str], fields: tuple[str, ...]) -> None:
    for field_name in fields:
        patterns = getattr(config, field_name, None) or {}
        for key in patterns:
            if not any(matches(rf"(.*\.)?({key})", n) for n in names):
                warnings.warn(f"{field_name} key {key!r} matched none of the targeted modules and is ignored; "
                              "check the key (a regex matched against the end of the module names)",
                              PeftRuntimeWarning, stacklevel=4)


def _warn_unused_excludes(config: PeftConfig, names: list[str]) -> None:
    """Warn about ``exclude_modules`` entries (or the regex) that match no module of the model (reference:
    ``BaseTuner.inject_adapter``, which warns when nothing at all was excluded)."""
    exclude = getattr(config, "exclude_modules", None)
    if not exclude:
        return
    entries = [exclude] if isinstance(exclude, str) else sorted(exclude)
    unused = [e for e in entries if not any(matches(e if isinstance(exclude, str) else [e], n) for n in names)]
    if unused:
        close = list(dict.fromkeys(hit for e in unused for hit in closest_names(e, names)))
        warnings.warn(f"exclude_modules entries {unused} matched no module of the model, so they exclude nothing; "
                      f"closest names: {', '.join(close) or '-'}. Check exclude_modules.", PeftWarning, stacklevel=4)


def _warn_fan_in_fan_out(config: PeftConfig, layers: list[LayerPlan]) -> None:
    """``fan_in_fan_out=True`` on layers that store their weight ``(out, in)`` (``nn.Linear``): the reference warns
    and resets it; peftkit detects the layout per layer (the plan's ``fan_in_fan_out``) and warns that the value is
    ignored. ``False`` on transformers' ``Conv1D`` is not warned about: the detection makes it right."""
    if getattr(config, "fan_in_fan_out", False) is not True:
        return
    plain = [lp.name for lp in layers if lp.options.get("fan_in_fan_out") is False]
    if plain:
        more = " ..." if len(plain) > 5 else ""
        warnings.warn(f"fan_in_fan_out=True is set but the targeted modules {plain[:5]}{more}"
                      " store their weight as (out, in) (torch.nn.Linear); it is ignored for them (peftkit detects "
                      "transformers' Conv1D by itself). Leave fan_in_fan_out at False.", PeftWarning, stacklevel=4)


def _tied_embeddings(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(input embeddings, output embeddings)`` when the model ties their weights, else None."""
    emb_in, emb_out = model_embedding(model, "get_input_embeddings"), model_embedding(model, "get_output_embeddings")
    w_in, w_out = getattr(emb_in, "weight", None), getattr(emb_out, "weight", None)
    if isinstance(w_in, nn.Parameter) and w_in is w_out:
        return emb_in, emb_out
    return None


def _warn_tied_embeddings(
    model: nn.Module, planned: list[tuple[str, nn.Module]], saved: list[tuple[str, nn.Module]]
) -> None:
    """Warn when the model ties its input and output embeddings and the adapter targets (or saves a copy of) one of
    them (reference: ``BaseTuner._check_tied_modules``): the two stop being one weight for the adapter."""
    tied = _tied_embeddings(model)
    if tied is None:
        return
    hits = [name for name, module in [*planned, *saved]
            if any(module is t or getattr(module, "base_layer", None) is t for t in tied)]
    if hits:
        warnings.warn(f"the model ties its input and output embeddings (tie_word_embeddings=True) and the adapter "
                      f"targets {hits}: the adapter applies to one of the tied modules only, which can surprise when "
                      "merging or converting to other formats. Load the model with tie_word_embeddings=False (and "
                      "copy the embedding weight into the output head) to untie them first.", PeftWarning,
                      stacklevel=4)


def _show(value: object) -> str:
    return repr(sorted(value)) if isinstance(value, (set, frozenset)) else repr(value)


def _examples(modules: list[tuple[str, nn.Module]]) -> list[str]:
    leaves = dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in modules if is_linear_like(m))
    return list(leaves)[:4]


def all_linear_names(model: nn.Module, config: PeftConfig) -> set[str]:
    """Full names of the modules ``target_modules="all-linear"`` selects in ``model`` (see :func:`_all_linear`)."""
    return _all_linear(model, config, list(candidate_modules(model)))
