"""``PeftModel`` and its six task subclasses: thin wrappers that route inputs and delegate to the tuner.

Structure (as in the reference, so checkpoint keys and attribute paths match): ``peft_model.base_model`` is the
tuner (``LoraModel``) and ``peft_model.base_model.model`` the user's model, whose modules were replaced in place
by adapter layers.

Where trainability changes (the reference surprises users here; peftkit makes it explicit):

* ``get_peft_model`` freezes the base model; the adapter trains unless ``config.inference_mode`` is True.
* ``add_adapter`` adds a frozen, inactive adapter; ``set_adapter`` activates it.
* ``load_adapter`` / ``from_pretrained`` load frozen adapters unless ``is_trainable=True``.
* ``set_adapter(name)`` keeps each adapter's own trainability (the reference makes it trainable);
  pass ``inference_mode=False`` to make it trainable, ``True`` to freeze it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .config import PeftConfig
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    NotPromptLearningError,
    PeftWarning,
    UnsupportedOperationError,
)
from .fileio import HUB_KWARGS
from .injection.apply import probing, weights_follow
from .injection.plan import QA_HEADS, SEQ_CLS_HEADS
from .model_surface import (
    bind_forward,
    declare_labels,
    drop_tied_aliases,
    enable_input_grads,
    forgive_tied_aliases,
)
from .module_utils import gc_paused, parameter_grads, walk_modules
from .registry import get_method
from .serialization.files import read_adapter, save_adapter_files
from .serialization.model_card import render_model_card, write_model_card
from .serialization.state_dict import (
    check_state_dict_shapes,
    get_peft_model_state_dict,
    input_embedding,
    set_peft_model_state_dict,
)
from .tuner import TunerModel, tuner_class
from .tuner_base import check_adapter_name
from .types import TaskType

_LOAD_KWARGS = ("subfolder", *HUB_KWARGS)


def _split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in _LOAD_KWARGS}


class PeftModel(nn.Module):
    """A model with adapters: ``forward`` runs the base model, whose targeted layers now carry adapters.

    Args:
        model: the base model (modified in place: targeted modules are replaced by adapter layers).
        peft_config: the adapter's config; peftkit keeps its own copy and never writes to this object.
        adapter_name: name of the first adapter.
        autocast_adapter_dtype: keep adapters in float32 on float16/bfloat16 bases.
    """

    #: modules the task adds to ``modules_to_save`` (classification heads)
    _task_heads: tuple[str, ...] = ()
    #: label inputs declared on the class's ``forward`` signature (``transformers.Trainer`` reads them from the class)
    _label_names: tuple[str, ...] = ("labels",)
    #: transformers' marker of a model carrying adapters (lets ``Trainer`` fine-tune a quantized base through it)
    _hf_peft_config_loaded = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            cls.forward = declare_labels(cls.forward, cls._label_names)  # type: ignore[method-assign]

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        config = _config_for_model(model, peft_config)
        self.base_model: TunerModel = tuner_class(config.peft_type)(
            model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype, task_heads=self._task_heads,
        )
        #: True inside ``disable_adapter()`` (the reference's flag, read by ``has_active_enabled_adapter``)
        self._adapters_disabled = False
        # the wrappers take the wrapped model's mode (nn.Module starts in training mode; the reference's PeftModel
        # reports training=True around an eval-mode model)
        self.training = self.base_model.training = model.training
        self._trainer_surface()
        if _is_checkpointing(model) and not getattr(model, "is_quantized", False):
            enable_input_grads(model)  # as the reference does for a base that already checkpoints

    def _trainer_surface(self) -> None:
        """What ``Trainer``/TRL read by duck-typing (see ``peftkit.model_surface``): the wrapped model's forward
        signature on ``self.forward``, tied weights stored once in ``state_dict()``."""
        bound = bind_forward(self, self.get_base_model())
        if bound is not None:
            self.forward = bound
        self.register_state_dict_post_hook(drop_tied_aliases)
        self.register_load_state_dict_post_hook(forgive_tied_aliases)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("forward", None)  # a bound method of this instance; rebuilt by __setstate__
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        bound = bind_forward(self, self.get_base_model())
        if bound is not None:
            self.forward = bound

    def _get_name(self) -> str:
        """The wrapped model's class name (``Trainer`` picks shifted-label smoothing for causal LMs by this name)."""
        return self.get_base_model()._get_name()

    def __repr__(self) -> str:
        text = super().__repr__()
        return type(self).__name__ + text[len(self._get_name()):]

    # ------------------------------------------------------------------ forwarding
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the base model (adapters act inside its layers).

        ``adapter_names``: one adapter name per row of the batch (``"__base__"`` for none), inference only.
        """
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self.base_model.mixed_batch(adapter_names, _batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` of the base model; ``adapter_names`` routes each input row (and its beams/samples).

        The tuner's ``generate`` is the model's (a ``PromptTuner`` injects the virtual tokens into it)."""
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self.base_model.mixed_batch(adapter_names, _batch_size(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers inside)."""
        return self.base_model.model

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The base model's ``activation_checkpointing_enable``, then input embeddings that output tensors requiring
        grad (so re-entrant checkpointing of a frozen base still trains the adapters)."""
        self.get_base_model().activation_checkpointing_enable(*args, **kwargs)
        enable_input_grads(self.get_base_model())

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The base model's ``gradient_checkpointing_enable`` (older name), then input grads as above."""
        self.get_base_model().gradient_checkpointing_enable(*args, **kwargs)
        enable_input_grads(self.get_base_model())

    # ------------------------------------------------------------------ adapters
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """``{adapter_name: config}`` (peftkit's copies, with resolved ``target_modules``)."""
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def peft_type(self) -> str:
        return self.base_model.peft_type

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new, inactive and frozen adapter. Raises for a taken name or another method's config; the model is
        unchanged when this raises."""
        config = _config_for_model(self.get_base_model(), peft_config, warn=False)
        self.base_model.inject_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Activate ``adapter_name``; see the module docstring for what happens to trainability."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether :func:`peftkit.convert_to_lora` can turn adapter ``adapter_name`` into a LoRA (False for
        prompt-learning methods; otherwise every adapter layer must support it), as the reference."""
        if self.active_peft_config.is_prompt_learning:
            return False
        return self.base_model.supports_lora_conversion(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` (raises for an unknown or merged adapter)."""
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside, the model computes the base model's outputs; on exit the previous state returns.

        As the reference: layers that were all disabled before stay disabled; when some were enabled and others
        disabled (``"irregular"``) a warning is given and all are enabled on exit."""
        state = self.base_model.adapter_layers_enabled()
        if state == "irregular":
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled", PeftWarning, stacklevel=3)
        was_disabled = self._adapters_disabled
        self.base_model.disable_adapter_layers()
        self._adapters_disabled = True
        try:
            yield
        finally:
            if state is not False:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (shared parameters counted once)."""
        trainable = total = 0
        for param in self.parameters():
            count = _numel(param)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: T || all params: A || trainable%: P`` exactly as the reference does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter's ``adapter_config.json`` and weights: ``default`` at the root, others in
        ``<dir>/<name>/``, plus a ``README.md`` model card. Each adapter's files replace the old ones all or
        nothing, even if the process is killed (see :mod:`peftkit.transaction`); concurrent saves serialize.

        ``save_embedding_layers``: ``True`` also stores the full embedding matrices; ``"auto"`` does so only when
        the vocabulary size differs from the base model's saved config (the reference also does it whenever an
        embedding layer is targeted, which makes files large for no gain); ``False`` never.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ConfigError("save_directory", save_directory, "allowed: a directory path, not a file")
        if path_initial_model_for_weight_conversion is not None:
            for name in self.peft_config if selected_adapters is None else selected_adapters:
                if name in self.peft_config and get_method(self.peft_config[name].peft_type).convert_for_save is None:
                    raise ConfigError("path_initial_model_for_weight_conversion",
                                      path_initial_model_for_weight_conversion,
                                      f"adapter {name!r} ({self.peft_config[name].peft_type}) cannot be converted; "
                                      "allowed: None")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            if name not in self.peft_config:
                raise AdapterNotFoundError(name, self.peft_config)
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        for name in names:
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            embeddings = self._save_embeddings(save_embedding_layers)
            tensors = get_peft_model_state_dict(self, kwargs.get("state_dict"), name, save_embedding_layers=embeddings)
            config = self.peft_config[name]
            if path_initial_model_for_weight_conversion is not None:
                convert = get_method(config.peft_type).convert_for_save
                assert convert is not None
                config, tensors = convert(config, tensors, os.fspath(path_initial_model_for_weight_conversion))
            if config.task_type is None and config.auto_mapping is None:
                config = config.copy(auto_mapping=_auto_mapping(self.get_base_model()))
            # a saved adapter loads frozen (as the reference); config and weights replace the old ones together
            save_adapter_files(target, config.copy(inference_mode=True), tensors, safe_serialization)
        self.create_or_update_model_card(save_directory)

    def _save_embeddings(self, save_embedding_layers: bool | str) -> bool:
        if save_embedding_layers != "auto":
            return bool(save_embedding_layers)
        base_path = next(iter(self.peft_config.values())).base_model_name_or_path
        emb = input_embedding(self.get_base_model())  # None also where the model's method raises (ConvNeXt)
        config_file = os.path.join(base_path, "config.json") if base_path else None
        if emb is None or config_file is None or not os.path.isfile(config_file):
            return False
        with open(config_file, encoding="utf-8") as fh:
            vocab = json.load(fh).get("vocab_size")
        resized = vocab is not None and vocab != emb.weight.shape[0]
        if resized:
            warnings.warn(f"the vocabulary was resized ({vocab} -> {emb.weight.shape[0]} rows), so the embedding "
                          "matrices are saved with the adapter", PeftWarning, stacklevel=3)
        return resized

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write ``README.md`` with the header the Hub reads (an existing card is kept)."""
        base = self.get_base_model()
        quant = getattr(getattr(base, "config", None), "quantization_config", None)
        quant_dict = quant.to_dict() if hasattr(quant, "to_dict") else quant
        is_transformers = any(c.__name__ == "PreTrainedModel" for c in type(base).__mro__)
        write_model_card(output_dir, render_model_card(self.peft_config, is_transformers, quant_dict))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """Upload the adapter files (as ``save_pretrained`` writes them, ``save_kwargs`` passed on) and a model card
        with ``library_name: peft``, ``base_model`` and ``tags`` to the Hub repo ``repo_id`` in one commit.

        Returns ``huggingface_hub``'s ``CommitInfo``. ``max_shard_size`` is accepted and ignored, as the reference's
        ``save_pretrained`` ignores it (adapters are never sharded)."""
        from .serialization.hub import push_to_hub

        return push_to_hub(lambda tmp: self.save_pretrained(tmp, **save_kwargs), repo_id,
                           commit_message=commit_message, commit_description=commit_description, private=private,
                           token=token, revision=revision, create_pr=create_pr, tags=tags)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (a directory or a Hub repo).

        The adapter is frozen unless ``is_trainable``. Files are read and checked before the model is touched; if
        loading fails the model is restored exactly (modules and ``requires_grad``).
        """
        check_adapter_name(adapter_name)  # before any file is read
        hub = _split_hub_kwargs(kwargs)
        torch_device = kwargs.pop("torch_device", None)
        if config is not None and not isinstance(config, PeftConfig):
            raise ConfigError("config", type(config).__name__, "allowed: a PeftConfig instance or None")
        config, weights = read_adapter(model_id, config, device=torch_device, **hub)
        _check_trainable_load(config, is_trainable)
        config = config.copy(inference_mode=not is_trainable)
        target_cls = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(config.task_type), cls)
        if key_mapping is None:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
        grads = parameter_grads(model)  # restored if loading fails
        if _needs_probe(config, allocates=is_trainable and not low_cpu_mem_usage):
            try:
                with probing(), gc_paused():
                    probe = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                       low_cpu_mem_usage=True)
                    try:
                        check_state_dict_shapes(probe, weights, adapter_name,
                                                kwargs.get("ignore_mismatched_sizes", False), key_mapping)
                    finally:
                        probe.base_model._restore_model()  # adapters and LoRA's replicated layers
            finally:
                for param, grad in grads:
                    param.requires_grad_(grad)
        try:
            # low_cpu_mem_usage: adapter tensors start on meta; loading fills them, missing ones become zeros
            with _skip_init_unless(is_trainable and not low_cpu_mem_usage), gc_paused():
                peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                        low_cpu_mem_usage=low_cpu_mem_usage)
                try:
                    result = set_peft_model_state_dict(
                        peft_model, weights, adapter_name, kwargs.pop("ignore_mismatched_sizes", False),
                        key_mapping=key_mapping, assign=True,
                    )
                except BaseException:
                    peft_model.base_model._restore_model()
                    raise
        except BaseException:
            for param, grad in grads:
                param.requires_grad_(grad)
            raise
        _warn_incompatible(result)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> _IncompatibleKeys:
        """Load a saved adapter under ``adapter_name`` beside the existing ones (not activated).

        Frozen unless ``is_trainable``. Returns ``(missing_keys, unexpected_keys)``; raises (leaving the model
        unchanged) for missing/corrupt files, shape mismatches, or a checkpoint that matches nothing.
        """
        check_adapter_name(adapter_name)  # before any file is read
        hub = _split_hub_kwargs(kwargs)
        if adapter_name in self.peft_config:
            raise AdapterExistsError(f"Adapter with name {adapter_name!r} already exists.")
        config, weights = read_adapter(model_id, device=torch_device, **hub)
        config = config.copy(inference_mode=not is_trainable)
        _check_trainable_load(config, is_trainable)
        if _needs_probe(config, allocates=is_trainable):
            with probing():
                probe = self.base_model.inject_adapter(config, adapter_name,
                                                       autocast_adapter_dtype=autocast_adapter_dtype)
                try:
                    check_state_dict_shapes(self, weights, adapter_name, kwargs.get("ignore_mismatched_sizes", False),
                                            key_mapping)
                finally:
                    self.base_model.remove_injected(probe)
        with _skip_init_unless(is_trainable):
            applied = self.base_model.inject_adapter(config, adapter_name,
                                                     autocast_adapter_dtype=autocast_adapter_dtype)
            try:
                result = set_peft_model_state_dict(
                    self, weights, adapter_name, kwargs.pop("ignore_mismatched_sizes", False), key_mapping=key_mapping,
                    assign=True,
                )
            except BaseException:
                self.base_model.remove_injected(applied)
                raise
        _warn_incompatible(result)
        if not is_trainable:
            self.eval()
        return result

    # ------------------------------------------------------------------ status
    def get_layer_status(self) -> list[Any]:
        """One ``TunerLayerStatus`` per adapter layer and ``modules_to_save`` wrapper (see ``peftkit.status``)."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """A ``TunerModelStatus`` summary of the adapters ("irregular" where layers disagree; see ``peftkit.status``)."""
        from .status import get_model_status

        return get_model_status(self)

    # ------------------------------------------------------------------ the reference's helpers
    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter (of the first one when several are active)."""
        active = self.active_adapter
        return self.peft_config[active if isinstance(active, str) else active[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside ``disable_adapter()`` (for a layer method: unless no adapter is active), as the reference."""
        if self.active_peft_config.is_prompt_learning:
            return not self._adapters_disabled
        return not self._adapters_disabled or not self.active_adapters

    @property
    def modules_to_save(self) -> set[str] | None:
        """The union of the adapters' ``modules_to_save`` (task heads included), None when empty."""
        modules: set[str] = set()
        for config in self.peft_config.values():
            modules.update(getattr(config, "modules_to_save", None) or ())
        return modules or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The wrapped model's ``dtype`` attribute (transformers models have one), else None."""
        return getattr(self.base_model, "dtype", None)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Enable (default) or disable gradients of the named adapters' tensors, active or not. The choice is
        kept by later ``set_adapter`` calls. Not for prompt-learning methods (``TypeError``, as the reference)."""
        if self.active_peft_config.is_prompt_learning:
            raise UnsupportedOperationError(
                "Setting `requires_grad` is not supported for prompt learning methods like "
                f"{self.active_peft_config.peft_type.value}."  # type: ignore[union-attr]
            )
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s input embeddings output tensors that require grad (unless it is quantized), so that
        re-entrant gradient checkpointing of a frozen base still trains the adapters; returns ``model``."""
        quantized = any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit",
                                                                  "is_quantized"))
        if not quantized:
            enable_input_grads(model)
        return model

    def _prompt_tuner(self, what: str) -> Any:
        if not self.active_peft_config.is_prompt_learning:
            raise NotPromptLearningError(f"{what} is only available for prompt learning methods (prompt tuning, "
                                         f"P-tuning, prefix tuning); this model holds {self.peft_type} adapters")
        return self.base_model

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The tensor saved as ``prompt_embeddings`` for a prompt-learning adapter, detached on CPU:
        ``(num_virtual_tokens * num_transformer_submodules, token_dim)`` for prompt tuning / P-tuning,
        ``(num_virtual_tokens, num_layers * 2 * token_dim)`` for prefix tuning."""
        tuner = self._prompt_tuner("get_prompt_embedding_to_save")
        if adapter_name not in tuner.prompt_encoder:
            raise AdapterNotFoundError(adapter_name, tuner.prompt_encoder.keys())
        with torch.no_grad():
            return tuner.prompt_encoder[adapter_name].output().detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None,
                   max_cache_len: int | None = None) -> Any:
        """The active prompt-learning adapter's virtual prompts for ``batch_size`` rows: prompt tuning / P-tuning
        ``(batch_size, num_virtual_tokens * num_transformer_submodules, token_dim)``; prefix tuning a transformers
        cache holding per-layer keys and values ``(batch_size, heads, num_virtual_tokens, head_dim)``.
        ``task_ids`` (multitask prompt tuning) and ``max_cache_len`` are accepted for the reference's signature."""
        tuner = self._prompt_tuner("get_prompt")
        config = self.active_peft_config
        if str(get_method(str(config.peft_type)).prompt_routing) == "prefix":
            return tuner.prefix_cache(batch_size, encoder_decoder=config.num_transformer_submodules == 2)
        return tuner.prompts(batch_size)


PeftModel.forward = declare_labels(PeftModel.forward, PeftModel._label_names)  # type: ignore[method-assign]


class PeftModelForCausalLM(PeftModel):
    """Causal language models: ``forward`` and ``generate`` pass through."""

    def prepare_inputs_for_generation(self, *args: Any, task_ids: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """The base model's (prompt methods add their virtual tokens). ``task_ids`` is the reference's parameter
        for multitask prompt tuning, which peftkit does not implement; other methods ignore it, as there."""
        return self.base_model.prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models; ``generate`` takes keyword arguments only, as in the reference."""

    def generate(self, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().generate(**kwargs)

    def prepare_inputs_for_generation(self, *args: Any, task_ids: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """As :meth:`PeftModelForCausalLM.prepare_inputs_for_generation`."""
        return self.base_model.prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification: the ``classifier`` / ``score`` head is trained in full (``modules_to_save``)."""

    _task_heads = SEQ_CLS_HEADS


class PeftModelForTokenClassification(PeftModel):
    """Token classification: the ``classifier`` / ``score`` head is trained in full."""

    _task_heads = SEQ_CLS_HEADS


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA: the ``qa_outputs`` head is trained in full."""

    _task_heads = QA_HEADS
    _label_names = ("start_positions", "end_positions")


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings; nothing extra is trained."""

    _label_names = ()


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def _config_for_model(model: nn.Module, config: PeftConfig, warn: bool = True) -> PeftConfig:
    """peftkit's copy of ``config`` with ``base_model_name_or_path`` recorded from ``model``."""
    if not isinstance(config, PeftConfig):
        raise ConfigError("peft_config", type(config).__name__, "allowed: a PeftConfig instance (e.g. LoraConfig)")
    name = model.__dict__.get("name_or_path") or None
    changes: dict[str, Any] = {}
    if name is not None and config.base_model_name_or_path != name:
        if warn and config.base_model_name_or_path is not None:
            warnings.warn(f"base_model_name_or_path {config.base_model_name_or_path!r} is replaced by the model's "
                          f"name_or_path {name!r}", PeftWarning, stacklevel=3)
        changes["base_model_name_or_path"] = name
    if config.task_type is None and config.auto_mapping is None and _auto_mapping(model):
        changes["auto_mapping"] = _auto_mapping(model)
    return config.copy(**changes)


def _skip_init_unless(is_trainable: bool) -> contextlib.AbstractContextManager[None]:
    """Loading for inference: adapters skip their random init, the checkpoint overwrites them (a tensor missing from
    it is zeroed, which adds nothing). Trainable loads keep the normal init so that missing tensors still train."""
    return contextlib.nullcontext() if is_trainable else weights_follow()


def _needs_probe(config: PeftConfig, allocates: bool) -> bool:
    """Whether a load injects a throw-away adapter of ``config`` on the meta device first (:func:`probing`), to check
    the checkpoint's shapes and sizes before the real injection allocates the config's sizes: when the real one
    allocates (``allocates``: trainable loads init their tensors) or the method's init does anyway
    (``MethodSpec.init_allocates``: PiSSA / OLoRA, DoRA). Inference loads otherwise inject on meta already."""
    return allocates or get_method(str(config.peft_type)).init_allocates(config)


def _check_trainable_load(config: PeftConfig, is_trainable: bool) -> None:
    """A saved prompt-learning adapter holds the encoder's output, not the encoder: it loads for inference only."""
    if is_trainable and config.is_prompt_learning:
        raise ConfigError("is_trainable", True, "Cannot set a prompt learning adapter to trainable when loading "
                          "pretrained adapter (its file holds the prompt encoder's output, not the encoder); "
                          "allowed: False")


def _auto_mapping(model: nn.Module) -> dict[str, str] | None:
    """``{"base_model_class", "parent_library"}`` for transformers models (used by ``AutoPeftModel``)."""
    if not any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        return None
    return {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}


def _is_checkpointing(model: nn.Module) -> bool:
    """transformers' ``is_activation_checkpointing`` (``is_gradient_checkpointing`` before v5): some module has a
    true ``gradient_checkpointing`` flag. Read from each module's ``__dict__``, where transformers sets it: asking
    ``hasattr`` of every module costs a raised ``AttributeError`` per module that has none."""
    if not hasattr(type(model), "is_activation_checkpointing") and not hasattr(type(model), "is_gradient_checkpointing"):
        return False
    return any(vars(m).get("gradient_checkpointing") for _, m in walk_modules(model))


#: keyword inputs whose first dimension is the batch, in the order they are looked for
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "input_features", "pixel_values", "input_values", "x")


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Rows in the batch of a forward/generate call (None when no input tensor is recognised)."""
    for key in _BATCH_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) else None


def _numel(param: torch.Tensor) -> int:
    count = param.numel()
    if type(param).__name__ == "Params4bit":  # packed 4-bit weights hold two values per byte of storage
        storage = getattr(param, "quant_storage", None)
        count = count * 2 * (storage.itemsize if storage is not None else 1)
    return count


def _warn_incompatible(result: _IncompatibleKeys) -> None:
    if result.missing_keys:
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {result.missing_keys}", PeftWarning,
                      stacklevel=3)
    if result.unexpected_keys:
        warnings.warn(f"The checkpoint holds keys that belong to no adapter of this model (ignored): "
                      f"{result.unexpected_keys}", PeftWarning, stacklevel=3)
