"""The generic tuner: holds the user's model and ``{adapter_name: config}``, and manages adapters on it.

Methods are not subclasses of it; each registered method gets a named subclass (``LoraModel``) only so that
reprs and status reports read as users expect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    MergeError,
    PeftWarning,
    UnmergeableMethodError,
)
from .injection.apply import AppliedPlan, adapters_on_meta, apply_plan, rollback, set_submodule
from .injection.plan import InjectionPlan, plan_injection
from .layers.base import AdapterLayer
from .layers.modules_to_save import ModulesToSaveWrapper
from .layers.shared import SharedAdapterTensors
from .module_utils import freeze, gc_paused, walk_modules
from .quantization import (
    QuantizedMergeReport,
    QuantizedMergeWarning,
    check_requantizable,
    collect_merge_report,
    dequantize_linears,
    make_quantized_layers_trainable,
)
from .registry import MethodSpec, all_methods, get_method
from .tuner_base import BASE_ROW, BaseTuner, check_adapter_name


class TunerModel(BaseTuner):
    """Holds ``model`` (the user's model, modified in place) and the adapters injected into its layers.

    Attributes:
        model: the wrapped model.
        peft_config: ``{adapter_name: config}``; each config is peftkit's own copy with resolved targets.
        targeted_module_names: names of the modules holding adapter layers.
        merge_report: what the last merge into quantized layers changed (None until there was one).
    """

    merge_report: QuantizedMergeReport | None = None

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | dict[str, PeftConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, Any] | None = None,
        autocast_adapter_dtype: bool = True,
        task_heads: Sequence[str] = (),
    ) -> None:
        """``state_dict`` (the reference's parameter): when given, each adapter targets the modules its keys name
        (``<path>.lora_A.weight`` -> ``<path>``) instead of its config's ``target_modules``."""
        super().__init__(model, task_heads)
        self._loss_term: Any = None  # MethodSpec.loss_term of the method, set on injection
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        if state_dict is not None:
            configs = {name: targets_from_state_dict(config, state_dict) for name, config in configs.items()}
        # low_cpu_mem_usage: adapter tensors stay on the meta device until a checkpoint is loaded (as the reference)
        with adapters_on_meta() if low_cpu_mem_usage else contextlib.nullcontext():
            for name, config in configs.items():
                self.inject_adapter(config, name, autocast_adapter_dtype=autocast_adapter_dtype)
        self.model.peft_config = self.peft_config

    # ------------------------------------------------------------------ forwarding
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; a method's ``loss_term`` (e.g. AdaLoRA's regulariser) is added to ``outputs.loss``."""
        outputs = self.model(*args, **kwargs)
        if self._loss_term is not None and isinstance(getattr(outputs, "loss", None), torch.Tensor):
            term = self._loss_term(self)
            if term is not None:
                outputs.loss = outputs.loss + term
        return outputs

    # ------------------------------------------------------------------ adapters
    def adapter_modules(self) -> Iterator[tuple[str, AdapterLayer | ModulesToSaveWrapper]]:
        """``(name, module)`` of every adapter layer and ``modules_to_save`` wrapper in the model."""
        for name, module in walk_modules(self.model):
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield name, module

    def adapter_layers(self) -> Iterator[AdapterLayer]:
        """Every adapter layer of the model."""
        for _, module in self.adapter_modules():
            if isinstance(module, AdapterLayer):
                yield module

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether :func:`peftkit.convert_to_lora` can express adapter ``adapter_name`` as a LoRA: every layer holding
        it must say so (its effect is ``W + ΔW`` on a 2-d weight). Layers holding only other adapters do not count
        (the reference asks every layer, although its conversion fails on such a model)."""
        layers = [layer for layer in self.adapter_layers() if layer.has_adapter(adapter_name)]
        return bool(layers) and all(layer.supports_lora_conversion(adapter_name) for layer in layers)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict[str, Any]:
        """``model.config`` as a dict (``to_dict()``, or a dataclass's fields), or ``{"model_type": "custom"}`` for a
        model without one, as the reference."""
        model_config = getattr(model, "config", {"model_type": "custom"})
        if hasattr(model_config, "to_dict"):
            return model_config.to_dict()
        if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
            return dataclasses.asdict(model_config)
        return model_config

    def plan(self, config: PeftConfig, adapter_name: str) -> InjectionPlan:
        """The injection plan ``config`` would produce on this model (nothing is modified)."""
        return plan_injection(self.model, config, adapter_name, get_method(config.peft_type), self._task_heads,
                              self._nests_methods)

    def inject_adapter(
        self, config: PeftConfig, adapter_name: str, autocast_adapter_dtype: bool = True
    ) -> AppliedPlan:
        """Add adapter ``adapter_name`` built from ``config``. The model is unchanged if this raises.

        The first adapter becomes active and, unless ``config.inference_mode``, trainable; later adapters are added
        inactive and frozen.
        """
        method = self._check_new_adapter(config, adapter_name)
        # the method's structural change (LoRA's layer_replication) comes before planning, which must see it
        undo = method.prepare_model(self.model, config) if method.prepare_model is not None else None
        try:
            plan = plan_injection(self.model, config, adapter_name, method, self._task_heads, self._nests_methods)
            stored = config.copy(**_resolved_fields(config, plan))  # validates again: may raise, so before any swap
            with gc_paused():  # thousands of small long-lived objects: no collection passes while they are made
                applied = apply_plan(self.model, plan, config, method, autocast_adapter_dtype)
        except BaseException:
            if undo is not None:
                undo()
            raise
        if undo is not None:
            self._prepared[adapter_name] = undo
        first = not self.peft_config
        make_quantized_layers_trainable(self.model)  # e.g. bnb 4-bit CPU repacking would cut gradients off
        self.peft_config[adapter_name] = stored
        self._trainable[adapter_name] = not config.inference_mode
        self.prefix = method.prefix
        self._loss_term = method.loss_term
        modules = [lp.name for lp in plan.layers if "parameter_name" not in lp.options]
        parameters = [f"{lp.name}.{lp.options['parameter_name']}" for lp in plan.layers if "parameter_name" in lp.options]
        self.targeted_module_names = sorted({*self.targeted_module_names, *modules})
        self.targeted_parameter_names = sorted({*self.targeted_parameter_names, *parameters})
        if first:
            freeze(self.model)  # model.requires_grad_(False) in one walk
            self._active = [adapter_name]
        # only the touched modules hold the new adapter (and, for the first one, any adapter at all)
        touched = [self.model.get_submodule(name) for name in dict.fromkeys(applied.touched)]
        if method.shared_state is not None:  # tensors held once per model (VB-LoRA's vector bank)
            method.shared_state(self, config, adapter_name, [layer for module in touched for layer in _nested(module)])
        self._refresh_trainability([layer for module in touched for layer in _nested(module)])
        return applied

    def _check_new_adapter(self, config: PeftConfig, adapter_name: str) -> MethodSpec:
        method = super()._check_new_adapter(config, adapter_name)
        if config.is_prompt_learning:
            raise ConfigError("peft_type", str(config.peft_type), "prompt-learning methods are not injected")
        biased = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if biased and getattr(config, "bias", "none") != "none":
            raise ConfigError(
                "bias", config.bias,  # type: ignore[attr-defined]
                f"at most one adapter may train biases and adapter {biased[0]!r} already has "
                f"bias={self.peft_config[biased[0]].bias!r}; use bias='none'",  # type: ignore[attr-defined]
            )
        _warn_base_weight_init_with_others(self.peft_config, config, adapter_name)
        return method

    def remove_injected(self, applied: AppliedPlan) -> None:
        """Undo :meth:`inject_adapter` completely (used when a load fails after injection), including the model
        preparation the adapter made (``MethodSpec.prepare_model``)."""
        rollback(self.model, applied)
        self._drop_shared(applied.adapter_name)
        undo = self._prepared.pop(applied.adapter_name, None)
        if undo is not None:
            undo()
        self.peft_config.pop(applied.adapter_name, None)
        self._trainable.pop(applied.adapter_name, None)
        self._active = [a for a in self._active if a != applied.adapter_name]
        held = [(n, m) for n, m in self.adapter_modules() if not n.endswith("original_module")]
        self.targeted_module_names = [n for n, m in held if getattr(m, "parameter_name", None) is None]
        self.targeted_parameter_names = sorted(  # the wrappers of a module's parameters nest at ``.base_layer``
            f"{n.split('.base_layer')[0]}.{m.parameter_name}" for n, m in held
            if getattr(m, "parameter_name", None) is not None)
        self._refresh_trainability()

    def _drop_shared(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s tensors held once per model (``MethodSpec.shared_state``)."""
        for holder in self._modules.values():
            if isinstance(holder, SharedAdapterTensors) and adapter_name in holder:
                del holder[adapter_name]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Activate ``adapter_name`` (a name or a list; several active adapters add their updates).

        Trainability: by default each adapter keeps its own mode (trainable when created by ``get_peft_model`` /
        ``add_adapter`` with ``inference_mode=False`` or loaded with ``is_trainable=True``; frozen otherwise).
        ``inference_mode=False`` makes the activated adapters trainable, ``True`` freezes them.
        """
        names = self._require([adapter_name] if isinstance(adapter_name, str) else adapter_name)
        for path, module in self.adapter_modules():  # before anything changes: one modules_to_save copy per module
            if isinstance(module, ModulesToSaveWrapper):
                module.check_set_adapter(names, path)
        merged = list(dict.fromkeys(n for layer in self.adapter_layers() for n in layer.merged_adapters))
        if merged:  # the reference unmerges here; peftkit keeps them merged and applied (README), so say so
            warnings.warn(f"set_adapter while adapters {merged} are merged: they stay merged into the base weights "
                          "and apply together with the active adapters (the reference unmerges them first). Call "
                          "unmerge_adapter() before set_adapter() to use only the active adapters.", PeftWarning,
                          stacklevel=3)
        if inference_mode is not None:
            for name in names:
                self._trainable[name] = not inference_mode
        self._active = names
        self._refresh_trainability()

    def _refresh_trainability(self, modules: list[nn.Module] | None = None) -> None:
        """Push the active adapters and their trainability to every adapter layer (or just to ``modules``); set bias
        trainability."""
        for module in (m for _, m in self.adapter_modules()) if modules is None else modules:
            if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                continue
            module.set_adapter(self._active, trainable=self._trainable)
            if getattr(module, "disable_adapters", False):
                module.enable_adapters(False)
        for name in self._active:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none" and self._trainable.get(name):
                for param in self._bias_params(bias):
                    param.requires_grad_(True)

    def _bias_params(self, bias: str) -> list[nn.Parameter]:
        """Biases trained by ``bias="all"`` (every bias outside adapter internals) or ``"lora_only"``."""
        if bias.endswith("_only"):  # "lora_only", "hra_only", ...: the adapted layers' biases, as the reference
            return [
                layer.get_base_layer().bias for layer in self.adapter_layers()
                if isinstance(getattr(layer.get_base_layer(), "bias", None), nn.Parameter)
            ]
        return [p for n, p in self.model.named_parameters() if _is_base_bias(n, self.prefix)]

    def enable_adapter_layers(self) -> None:
        """Re-enable adapters after :meth:`disable_adapter_layers`."""
        for _, module in self.adapter_modules():
            module.enable_adapters(True)
        self._refresh_trainability()

    def disable_adapter_layers(self) -> None:
        """Make every adapter layer compute its base output (merged adapters are unmerged on the next forward)."""
        for name in self.peft_config:
            if getattr(self.peft_config[name], "bias", "none") != "none":
                warnings.warn(
                    f"adapter {name!r} has bias={self.peft_config[name].bias!r}: disabling adapters does not undo "
                    "the trained biases, so outputs differ from the base model's", PeftWarning, stacklevel=2,
                )
        for _, module in self.adapter_modules():
            module.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere. If it was active, the first remaining adapter (sorted) becomes active.

        Raises :class:`AdapterNotFoundError` for an unknown name and :class:`MergeError` (changing nothing) when the
        adapter is merged.
        """
        self._require([adapter_name])
        merged = [n for n, m in self.adapter_modules() if adapter_name in getattr(m, "merged_adapters", ())]
        if merged:
            raise MergeError(f"cannot delete adapter {adapter_name!r}: it is merged in {merged[:3]}; "
                             "call unmerge_adapter() first")
        for _, module in self.adapter_modules():
            module.delete_adapter(adapter_name)
        self._drop_shared(adapter_name)
        del self.peft_config[adapter_name]
        self._prepared.pop(adapter_name, None)  # a prepared structure stays, as the reference's replicated layers
        self._trainable.pop(adapter_name, None)
        remaining = [a for a in self._active if a != adapter_name]
        self._active = remaining or sorted(self.peft_config)[:1]
        if not remaining and self._active:
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{self._active[0]}.", PeftWarning, stacklevel=3)
        self._refresh_trainability()

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a combination of ``adapters`` weighted by ``weights`` (added inactive, like
        :meth:`inject_adapter`). The combination types and their rank rules are the method's (LoRA:
        ``peftkit.methods.lora.combine``).

        Raises :class:`AdapterNotFoundError` for an unknown source, :class:`AdapterExistsError` when
        ``adapter_name`` is taken (the reference returns silently), and :class:`ConfigError` for a weights/adapters
        length mismatch, sources of different peft types, or a method that cannot combine adapters.
        """
        method = self._check_combination(adapters, weights, adapter_name)
        assert method.combine is not None
        method.combine(self, list(adapters), [float(w) for w in weights], adapter_name,
                       combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                       svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                       majority_sign_method=majority_sign_method)

    def _check_combination(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> MethodSpec:
        if isinstance(adapters, str) or not adapters:
            raise ConfigError("adapters", adapters, "allowed: a non-empty list of adapter names")
        self._require(adapters)
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterExistsError(f"Adapter with name {adapter_name!r} already exists.")
        if isinstance(weights, str) or len(weights) != len(adapters):
            raise ConfigError("weights", weights, f"allowed: one weight per adapter ({len(adapters)} for {list(adapters)})")
        types = {a: str(self.peft_config[a].peft_type) for a in adapters}
        if len(set(types.values())) > 1:
            raise ConfigError("adapters", list(adapters), f"Cannot combine adapters with different peft types: {types}")
        method = get_method(next(iter(types.values())))
        if method.combine is None:
            able = [str(m.peft_type) for m in all_methods() if m.combine is not None]
            raise ConfigError("peft_type", str(method.peft_type), f"add_weighted_adapter supports: {able}")
        return method

    # ------------------------------------------------------------------ mixed batches
    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str], batch_size: int | None = None) -> Iterator[None]:
        """Route row ``i`` of the batches run inside this context through adapter ``adapter_names[i]``
        (``"__base__"``: no adapter). Inference only.

        Raises: ValueError in training mode or when ``batch_size`` differs from ``len(adapter_names)``;
        :class:`AdapterNotFoundError` for unknown names; :class:`MergeError` while adapters are merged.
        """
        names = tuple(adapter_names) if not isinstance(adapter_names, str) else (adapter_names,)
        self._check_mixed(names, batch_size)
        modules = [m for _, m in self.adapter_modules()]
        for module in modules:
            module._row_adapters = names
        try:
            yield
        finally:
            for module in modules:
                module._row_adapters = None

    def _check_mixed(self, names: tuple[str, ...], batch_size: int | None) -> None:
        if self.model.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval()")
        if batch_size is not None and batch_size != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows; "
                             "pass one adapter name per row")
        unknown = sorted({n for n in names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise AdapterNotFoundError(unknown[0] if len(unknown) == 1 else unknown,
                                       [*self.peft_config, BASE_ROW])
        merged = sorted({a for layer in self.adapter_layers() for a in layer.merged_adapters})
        if merged:
            raise MergeError(f"cannot route rows to adapters while {merged} are merged into the base weights; "
                             "call unmerge_adapter() first")

    # ------------------------------------------------------------------ merging
    def _check_mergeable(self, adapter_names: list[str] | None) -> None:
        if not get_method(self.peft_type).mergeable:
            raise UnmergeableMethodError(f"{self.peft_type} adapters cannot be merged")
        for config in self.peft_config.values():  # e.g. LoRA's replicated layers, which share their base weights
            check = get_method(str(config.peft_type)).check_merge
            if check is not None:
                check(self.model, config)
        if adapter_names is not None:
            self._require(adapter_names)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the updates of ``adapter_names`` (default: the active adapters) into the base weights.

        ``safe_merge`` checks every layer for NaN/inf first and raises :class:`MergeError` before writing anything.
        """
        self._check_mergeable(adapter_names)
        layers = list(self.adapter_layers())
        _warn_additional_merge(layers, adapter_names or self.active_adapters)
        for layer in layers:  # a quantized base that cannot be re-quantized refuses before anything is merged
            if layer._adapters_to_merge(adapter_names, warn=False):
                check_requantizable(layer.get_base_layer())
        if safe_merge:
            for layer in layers:
                layer.check_merge(adapter_names)
        for layer in reversed(layers):  # nested layers (mixed models) innermost first: OFT's rotation does not commute
            layer.merge(adapter_names=adapter_names)
        self._report_quantized_merge()

    def _report_quantized_merge(self) -> None:
        """Gather what merging into quantized layers changed (see ``peftkit.quantization.merge``): kept as
        ``merge_report`` and shown as a :class:`~peftkit.quantization.QuantizedMergeWarning`."""
        report = collect_merge_report([(n, m) for n, m in self.adapter_modules() if isinstance(m, AdapterLayer)])
        if report is not None:
            self.merge_report = report
            warnings.warn(QuantizedMergeWarning(report), stacklevel=3)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        layers = list(self.adapter_layers())
        if not any(layer.merged_adapters for layer in layers):
            warnings.warn("Already unmerged. Nothing to do.", PeftWarning, stacklevel=3)
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge (``adapter_names`` or the active adapters) and return the model without adapter layers.

        ``modules_to_save`` wrappers are replaced by the active adapter's trained copy. On a quantized base the
        merge re-quantizes each merged layer (the rounding is reported, see ``merge_report``); with
        ``dequantize=True`` every quantized linear is first replaced by a float32 ``nn.Linear`` holding its
        dequantized weight, so the merge is exact and the result is a full-precision model.
        """
        self._check_mergeable(adapter_names)
        if dequantize:
            dequantize_linears(self.model)
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap(keep_trained_copies=True, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """Return the base model with adapters removed and nothing merged (merged adapters are unmerged first).

        Unlike the reference, ``modules_to_save`` wrappers go back to the original module, so the result computes
        exactly what the base model computed before ``get_peft_model``.
        """
        for layer in self.adapter_layers():
            layer.unmerge()
        return self._unwrap(keep_trained_copies=False, progressbar=False)

    def _unwrap(self, keep_trained_copies: bool, progressbar: bool) -> nn.Module:
        modules = [(n, m) for n, m in self.adapter_modules()]
        iterator: Iterable[tuple[str, nn.Module]] = modules
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(modules, desc="Unloading " + ("and merging " if keep_trained_copies else "") + "model")
        unwrapped: list[str] = []
        for name, module in iterator:
            if any(name.startswith(outer + ".") for outer in unwrapped):
                continue  # nested in a layer already replaced by its innermost base (adapters on parameters)
            if isinstance(module, AdapterLayer):
                unwrap = getattr(type(module), "unwrap_base", None)  # a layer that also wraps inner modules (MHA)
                set_submodule(self.model, name, unwrap(module) if unwrap else module.get_base_layer())
                unwrapped.append(name)
            else:
                current = module._current() if keep_trained_copies else module.original_module
                set_submodule(self.model, name, current)
        if "peft_config" in self.model.__dict__:
            del self.model.__dict__["peft_config"]
        return self.model


def _warn_additional_merge(layers: list[AdapterLayer], names: Sequence[str]) -> None:
    """As the reference's ``check_adapters_to_merge``: merging more adapters on top of merged ones warns."""
    merged = list(dict.fromkeys(n for layer in layers for n in layer.merged_adapters))
    additional = [n for n in names if n not in merged]
    if merged and additional:
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
                      f"{','.join(additional)}.", PeftWarning, stacklevel=4)


def _warn_base_weight_init_with_others(configs: dict[str, PeftConfig], new: PeftConfig, new_name: str) -> None:
    """As the reference's ``PeftModel.add_adapter``: an init that rewrites the base weights (LoRA's PiSSA / OLoRA,
    ``MethodSpec.init_changes_base``) should not be combined with other adapters on the same model."""
    if not configs:
        return
    for config in (*configs.values(), new):
        if get_method(str(config.peft_type)).init_changes_base(config):
            init = getattr(config, "init_lora_weights", None)
            warnings.warn(f"init_lora_weights={init!r} (PiSSA/OLoRA) changes the base weights of the model and should "
                          f"thus not be used with other adapters (adding {new_name!r} next to {sorted(configs)}). "
                          "Consider converting that adapter into a normal LoRA adapter: save_pretrained("
                          "path_initial_model_for_weight_conversion=...).", PeftWarning, stacklevel=5)
            return


def _resolved_fields(config: PeftConfig, plan: InjectionPlan) -> dict[str, Any]:
    """What peftkit's stored copy of ``config`` records beyond the user's values: resolved targets, task heads, and
    ``fan_in_fan_out=True`` when every targeted layer is a GPT-2 ``Conv1D`` (as the reference writes it)."""
    fields: dict[str, Any] = {
        "target_modules": plan.target_modules,
        "modules_to_save": list(plan.modules_to_save_names) if plan.modules_to_save_names else None,
        **plan.config_fields,
    }
    if not hasattr(config, "modules_to_save"):  # TrainableTokensConfig has no such field (as the reference's)
        del fields["modules_to_save"]
    if hasattr(config, "fan_in_fan_out") and all(lp.options.get("fan_in_fan_out") for lp in plan.layers):
        fields["fan_in_fan_out"] = True
    return fields


def _is_base_bias(name: str, prefix: str) -> bool:
    parts = name.split(".")
    if parts[-1] != "bias":
        return False
    internals = ("modules_to_save", "original_module")
    return not any(p.startswith(prefix) or p in internals for p in parts[:-1]) if prefix else True


_TUNER_CLASSES: dict[str, type[Any]] = {}


def targets_from_state_dict(config: PeftConfig, state_dict: dict[str, Any]) -> PeftConfig:
    """``config`` targeting the modules that ``state_dict``'s adapter keys name: ``[base_model.model.]<path>.<prefix>
    ...`` -> ``<path>`` (``<prefix>`` is the method's parameter prefix, e.g. ``lora_``; a ``torch.compile``
    ``_orig_mod.`` is dropped, as the reference)."""
    prefix = "." + get_method(str(config.peft_type)).prefix
    names = {key.removeprefix("base_model.model.").rsplit(prefix, 1)[0].removeprefix("_orig_mod.")
             for key in state_dict if prefix in key}
    return config.copy(target_modules=names)


def tuner_class(peft_type: object) -> type[TunerModel]:
    """The named tuner subclass of a method (``LoraModel`` for LoRA; a ``PromptTuner`` for prompt methods)."""
    spec = get_method(str(peft_type))
    if spec.tuner_name not in _TUNER_CLASSES:
        base: type[nn.Module] = TunerModel
        if spec.kind == "prompt":
            from .methods.prompt.tuner import PromptTuner

            base = PromptTuner
        bases = (base,) if spec.tuner_mixin is None else (spec.tuner_mixin, base)
        _TUNER_CLASSES[spec.tuner_name] = type(spec.tuner_name, bases, {"__module__": __name__})
    return _TUNER_CLASSES[spec.tuner_name]


def _nested(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and the adapter layers nested inside it as its ``base_layer`` chain (adapters on several
    parameters of one module wrap each other)."""
    yield module
    while isinstance(module, AdapterLayer) and isinstance(module.base_layer, AdapterLayer):
        module = module.base_layer
        yield module


def find_adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(name, layer)`` of every adapter layer in ``model``."""
    return [(n, m) for n, m in walk_modules(model) if isinstance(m, AdapterLayer)]



def __getattr__(name: str) -> type[TunerModel]:
    """Module attribute access to the named tuner classes (``peftkit.tuner.LoraModel``), which are created on first
    use; this is also how ``pickle`` finds them again."""
    for spec in all_methods():
        if spec.tuner_name == name:
            return tuner_class(spec.peft_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
