"""``PeftMixedModel``: adapters of different types (LoRA, LoHa, LoKr, AdaLoRA) on one model, active together.

As the reference's ``PeftMixedModel`` (``get_peft_model(model, config, mixed=True)``): the tuner
(``peft_mixed_model.base_model``, a :class:`MixedModel`) is the generic :class:`~peftkit.tuner.TunerModel` with the
one-type rule lifted. A method whose ``MethodSpec.mixed_compatible`` is False (IA3, the prompt-learning methods,
TrainableTokens) is refused with a :class:`~peftkit.errors.ConfigError` naming ``peft_type``.

Where two methods target the same module their layers nest, in the order the adapters were added: the new
method's layer wraps the module's current (outermost) layer, and an adapter of a method already outermost there is
added to that layer. A LoRA, then a LoHa, then a LoKr adapter on ``q_proj`` give
``lokr.Linear(base_layer=loha.Linear(base_layer=lora.Linear(base_layer=nn.Linear)))``, the reference's structure
and in-memory keys. Every layer adds its active adapters' updates to the output of its ``base_layer``, so for
``x: (..., in)`` the output is ``W x + b + Σ_active Δ_a(x)``, whatever the nesting; merging adds each ``ΔW_a`` into
the innermost base weight.

Files: each adapter is saved as an ordinary adapter directory (``default`` at the root, others in
``<dir>/<name>/``), with the keys the adapter alone on the model has (no ``base_layer`` segments from the nesting),
so that the reference's ``PeftModel`` / ``PeftMixedModel.load_adapter`` and peftkit's load each one. The reference
cannot save a mixed model (its ``save_pretrained`` raises ``NotImplementedError``).

Trainability follows ``PeftModel`` (see ``peftkit.peft_model``): the first adapter trains unless
``config.inference_mode``; added adapters are inactive until ``set_adapter``; loaded ones are frozen unless
``is_trainable=True``; only active adapters have ``requires_grad``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .config import PeftConfig
from .errors import ConfigError, MergeError, UnsupportedOperationError
from .injection.apply import adapters_on_meta, apply_plan
from .injection.plan import plan_modules_to_save
from .model_surface import enable_input_grads
from .peft_model import PeftModel, _config_for_model, _is_checkpointing
from .registry import MethodSpec, all_methods, get_method
from .tuner import TunerModel


def mixed_types() -> list[str]:
    """The ``peft_type`` values a mixed model accepts (methods whose spec sets ``mixed_compatible``)."""
    return sorted(str(spec.peft_type) for spec in all_methods() if spec.mixed_compatible)


def check_mixed_compatible(config: object) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``, as the reference) unless ``config`` is a config of a method
    that may share a model with other adapter types."""
    if not isinstance(config, PeftConfig):
        raise ConfigError("peft_config", type(config).__name__, "allowed: a PeftConfig instance (e.g. LoraConfig)")
    if not get_method(str(config.peft_type)).mixed_compatible:
        raise ConfigError("peft_type", str(config.peft_type),
                          f"PeftMixedModel mixes adapters of the types {mixed_types()} (the reference's "
                          "COMPATIBLE_TUNER_TYPES that peftkit implements)")


class MixedModel(TunerModel):
    """The tuner of a :class:`PeftMixedModel`: a :class:`~peftkit.tuner.TunerModel` whose adapters may have
    different (mixed-compatible) types; their layers nest on shared modules (module docstring)."""

    _nests_methods = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward. No method's ``loss_term`` is added (AdaLoRA's orthogonality regulariser is
        ``AdaLoraModel``'s; the reference's ``MixedModel`` does not add it either)."""
        return self.model(*args, **kwargs)

    def _check_new_adapter(self, config: PeftConfig, adapter_name: str) -> MethodSpec:
        check_mixed_compatible(config)
        return super()._check_new_adapter(config, adapter_name)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:  # type: ignore[override]
        """Delete one adapter or a list of them. Unknown names (:class:`~peftkit.errors.AdapterNotFoundError`) and
        merged adapters (:class:`~peftkit.errors.MergeError`) raise before anything is deleted."""
        names = self._require([adapter_name] if isinstance(adapter_name, str) else adapter_name)
        merged = sorted({n for layer in self.adapter_layers() for n in layer.merged_adapters if n in names})
        if merged:
            raise MergeError(f"cannot delete adapters {merged}: they are merged; call unmerge_adapter() first")
        for name in names:
            super().delete_adapter(name)

    def add_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        """Give adapter ``adapter_name`` a full trainable copy of each module ``config.modules_to_save`` names (a new
        wrapper, or a copy added to an existing one) and record them in the adapter's stored config, so they are
        saved with it. Raises :class:`~peftkit.errors.AdapterNotFoundError` for an unknown adapter and
        :class:`~peftkit.errors.NoMatchingPeftModuleError` for an entry matching no module; the model is unchanged
        when this raises."""
        names = list(getattr(config, "modules_to_save", None) or [])
        if not names:
            return
        stored = self.peft_config[self._require([adapter_name])[0]]
        updated = stored.copy(modules_to_save=list(dict.fromkeys([*(stored.modules_to_save or []), *names])))
        plan = plan_modules_to_save(self.model, config, adapter_name)
        applied = apply_plan(self.model, plan, stored, get_method(stored.peft_type))
        self.peft_config[adapter_name] = updated
        self._refresh_trainability([self.model.get_submodule(name) for name in dict.fromkeys(applied.touched)])

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not available for mixed models (``NotImplementedError``, as the reference)."""
        raise NotImplementedError(f"Weighted adapters are not supported for {type(self).__name__} (yet); combine "
                                  "adapters of one type in a PeftModel")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate``."""
        return self.model.generate(*args, **kwargs)


class PeftMixedModel(nn.Module):
    """A model holding adapters of different types (LoRA, LoHa, LoKr, AdaLoRA), several active at once.

    Usually made by ``get_peft_model(model, config, mixed=True)`` or :meth:`from_pretrained`; add more adapters with
    :meth:`add_adapter` / :meth:`load_adapter`, activate any subset with :meth:`set_adapter`.

    Args:
        model: the base model (modified in place: targeted modules are replaced by adapter layers).
        peft_config: the first adapter's config (of a mixed-compatible type); peftkit keeps its own copy.
        adapter_name: name of the first adapter.
        autocast_adapter_dtype: keep adapters in float32 on float16/bfloat16 bases.
        low_cpu_mem_usage: leave the adapter tensors on the meta device until a checkpoint is loaded.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        check_mixed_compatible(peft_config)  # before the model is touched
        config = _config_for_model(model, peft_config)
        self.base_model: MixedModel = MixedModel(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                                 autocast_adapter_dtype=autocast_adapter_dtype)
        #: True inside ``disable_adapter()``
        self._adapters_disabled = False
        self.training = self.base_model.training = model.training
        if _is_checkpointing(model) and not getattr(model, "is_quantized", False):
            enable_input_grads(model)  # as the reference does for a base that already checkpoints

    # ------------------------------------------------------------------ forwarding
    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper lacks come from the tuner (and through it from the model)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the base model; every active adapter adds its update inside the adapted layers."""
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``."""
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers inside)."""
        return self.base_model.model

    # ------------------------------------------------------------------ adapters
    # the tuner's views, as PeftModel's: peft_config ({adapter_name: peftkit's copy}), the active adapters and the
    # union of the adapters' modules_to_save (None when empty)
    peft_config = PeftModel.peft_config
    active_adapter = PeftModel.active_adapter
    active_adapters = PeftModel.active_adapters
    modules_to_save = PeftModel.modules_to_save

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new, inactive adapter of any mixed-compatible type. Raises :class:`ConfigError` for another type
        and for a taken name; the model is unchanged when this raises."""
        check_mixed_compatible(peft_config)
        config = _config_for_model(self.get_base_model(), peft_config, warn=False)
        with adapters_on_meta() if low_cpu_mem_usage else contextlib.nullcontext():
            self.base_model.inject_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Activate ``adapter_name`` (a name or a list; all of them apply). The order of the list does not matter:
        the updates add up. Trainability as :meth:`PeftModel.set_adapter <peftkit.PeftModel.set_adapter>`."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_modules_to_save(self, peft_config: PeftConfig, adapter_name: str) -> None:
        """Train and save a full copy of each module ``peft_config.modules_to_save`` names with adapter
        ``adapter_name``, as the reference (``get_peft_model`` / :meth:`add_adapter` already do this for the adapter's
        own config). Nothing happens when the config names none."""
        self.base_model.add_modules_to_save(peft_config, adapter_name)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Delete one adapter or a list (raises :class:`~peftkit.errors.AdapterNotFoundError` for an unknown name and
        :class:`~peftkit.errors.MergeError` for a merged one)."""
        self.base_model.delete_adapter(adapter_name)

    disable_adapter = PeftModel.disable_adapter

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) into the base weights and return the base model without
        adapter layers (arguments as ``TunerModel.merge_and_unload``: ``progressbar``, ``safe_merge``,
        ``adapter_names``, ``dequantize``)."""
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Return the base model with every adapter layer removed and nothing merged."""
        return self.base_model.unload(*args, **kwargs)

    # ------------------------------------------------------------------ parameters and status
    get_nb_trainable_parameters = PeftModel.get_nb_trainable_parameters
    print_trainable_parameters = PeftModel.print_trainable_parameters

    def get_layer_status(self) -> Any:
        """Not available for mixed models (``TypeError``, as the reference)."""
        raise UnsupportedOperationError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self) -> Any:
        """Not available for mixed models (``TypeError``, as the reference)."""
        raise UnsupportedOperationError(f"get_model_status is not supported for {type(self).__name__}.")

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write every adapter (or ``selected_adapters``) as an ordinary adapter directory: ``default`` at the root,
        others in ``<dir>/<name>/``, each ``adapter_config.json`` + weights with the keys of the adapter alone on the
        model, so that either library loads each one into a ``PeftModel`` or a mixed model. Other keyword arguments
        as :meth:`PeftModel.save_pretrained <peftkit.PeftModel.save_pretrained>` (``save_embedding_layers``,
        ``is_main_process``, ``state_dict``). The reference cannot save mixed models."""
        PeftModel.save_pretrained(self, save_directory, safe_serialization,  # type: ignore[arg-type]
                                  selected_adapters, **kwargs)

    _save_embeddings = PeftModel._save_embeddings
    create_or_update_model_card = PeftModel.create_or_update_model_card
    push_to_hub = PeftModel.push_to_hub

    def load_adapter(self, model_id: str | os.PathLike[str], adapter_name: str, *args: Any,
                     **kwargs: Any) -> _IncompatibleKeys:
        """Load a saved adapter of a mixed-compatible type under ``adapter_name`` beside the others (inactive, frozen
        unless ``is_trainable=True``); arguments as :meth:`PeftModel.load_adapter <peftkit.PeftModel.load_adapter>`.
        Its layers wrap the layers already on the modules it targets."""
        return PeftModel.load_adapter(self, model_id, adapter_name, *args, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftMixedModel:
        """Wrap ``model`` in a mixed model and load the adapter saved in ``model_id`` as its first adapter (frozen
        unless ``is_trainable``). Files are read and the type is checked before the model is touched; other keyword
        arguments as :meth:`PeftModel.from_pretrained <peftkit.PeftModel.from_pretrained>`."""
        load = PeftModel.from_pretrained.__func__  # type: ignore[attr-defined]
        return load(cls, model, model_id, adapter_name, is_trainable, config, **kwargs)
