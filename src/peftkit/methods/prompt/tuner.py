"""``PromptTuner``: the prompt-learning counterpart of ``peftkit.tuner.TunerModel``.

It holds the user's model (never modified, except that its parameters are frozen and ``modules_to_save`` copies are
wrapped in) and one prompt encoder per adapter in ``prompt_encoder``. Its ``forward`` / ``generate`` /
``prepare_inputs_for_generation`` route the inputs through the active adapter's virtual tokens (see ``routing.py``),
so the ``PeftModel`` task classes call it exactly as they call a ``TunerModel``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, MergeError, PeftWarning
from ...injection.apply import AppliedPlan, apply_plan, rollback, set_submodule
from ...injection.plan import plan_modules_to_save
from ...layers.modules_to_save import ModulesToSaveWrapper
from ...layers.prompt import PromptEncoderDict, VirtualTokenEncoder
from ...module_utils import model_embedding
from ...registry import MethodSpec, get_method
from ...tuner_base import BaseTuner
from .config import PromptLearningConfig, resolve_prompt_config
from .routing import batch_size, prepend_mask, route_embeddings, route_prefix, split_prefix, task_rule

_PREFIX = "prefix"


def find_word_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input token embeddings: ``embeddings.word_embeddings``, else ``get_input_embeddings()``, else the
    module owning the first parameter whose first dimension is the vocabulary size (the reference's search)."""
    with contextlib.suppress(AttributeError):
        return model.get_submodule("embeddings.word_embeddings")
    found = model_embedding(model, "get_input_embeddings")
    if found is not None:
        return found
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    for name, param in model.named_parameters():
        if vocab is not None and param.dim() >= 1 and param.shape[0] == vocab:
            return model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return None


class PromptTuner(BaseTuner):
    """Holds ``model`` and the prompt encoders of its prompt-learning adapters (one active at a time).

    Attributes:
        model: the wrapped model (its parameters are frozen).
        prompt_encoder: ``{adapter_name: encoder}`` (``PromptEmbedding``, ``PromptEncoder`` or ``PrefixEncoder``).
        peft_config: ``{adapter_name: config}``; peftkit's copies with ``num_layers``, ``token_dim``,
            ``num_attention_heads``, ``num_transformer_submodules`` (and ``encoder_hidden_size``) resolved.
    """

    #: saved keys of ``modules_to_save`` copies drop this child's name, as the reference's (``base_model.score.weight``)
    checkpoint_transparent_child: str = "model"

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | dict[str, PeftConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        task_heads: Sequence[str] = (),
    ) -> None:
        super().__init__(model, task_heads)
        self.prompt_encoder = PromptEncoderDict()
        self._applied: dict[str, AppliedPlan] = {}
        self._disabled = False
        self.__dict__["_word_embeddings"] = find_word_embeddings(model)  # not registered: it belongs to the model
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.inject_adapter(config, name, autocast_adapter_dtype=autocast_adapter_dtype)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        if name == "prompt_encoder":
            return nn.Module.__getattr__(self, name)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ adapters
    @property
    def word_embeddings(self) -> nn.Module | None:
        """The model's input token embeddings (used to embed ``input_ids`` and for SAMPLE_VOCAB / TEXT init)."""
        return self.__dict__["_word_embeddings"]

    def adapter_modules(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """``(name, wrapper)`` of every ``modules_to_save`` wrapper in the model (prompt methods have no layers)."""
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def inject_adapter(
        self, config: PeftConfig, adapter_name: str, autocast_adapter_dtype: bool = True
    ) -> AppliedPlan:
        """Add adapter ``adapter_name``: its prompt encoder and its ``modules_to_save`` copies. The model is unchanged
        if this raises. The first adapter becomes active (and trainable unless ``config.inference_mode``); later
        ones are added inactive and frozen."""
        method = self._check_new_adapter(config, adapter_name)
        assert isinstance(config, PromptLearningConfig) and method.prompt_encoder is not None
        plan = plan_modules_to_save(self.model, config, adapter_name, self._task_heads)
        resolved = resolve_prompt_config(config, getattr(self.model, "config", None), config.task_type,
                                         kv_prefix=method.prompt_routing == _PREFIX)
        resolved["modules_to_save"] = list(plan.modules_to_save_names) if plan.modules_to_save_names else None
        stored = config.copy(**resolved)
        encoder = method.prompt_encoder(stored, self.word_embeddings)
        encoder.to(**self._encoder_placement(autocast_adapter_dtype))
        first = not self.peft_config
        applied = apply_plan(self.model, plan, stored, method, autocast_adapter_dtype)
        self.prompt_encoder[adapter_name] = encoder
        self.peft_config[adapter_name] = stored
        self._trainable[adapter_name] = not config.inference_mode
        self._applied[adapter_name] = applied
        if first:
            self.model.requires_grad_(False)
            self._active = [adapter_name]
        self._refresh_trainability()
        return applied

    def _check_new_adapter(self, config: PeftConfig, adapter_name: str) -> MethodSpec:
        method = super()._check_new_adapter(config, adapter_name)
        if method.kind != "prompt":
            raise ConfigError("peft_type", str(config.peft_type), "a PromptTuner holds prompt-learning adapters only")
        return method

    def _encoder_placement(self, autocast_adapter_dtype: bool) -> dict[str, Any]:
        """Encoders live on the word embeddings' device, in float32 (or the base dtype without autocast)."""
        source = self.word_embeddings if self.word_embeddings is not None else self.model
        param = next(source.parameters(), None)
        if param is None:
            return {}
        dtype = param.dtype if (not autocast_adapter_dtype and param.dtype.is_floating_point) else torch.float32
        return {"device": param.device, "dtype": dtype}

    def remove_injected(self, applied: AppliedPlan) -> None:
        """Undo :meth:`inject_adapter` completely (used when a load fails after injection)."""
        rollback(self.model, applied)
        self._forget(applied.adapter_name)

    def _forget(self, name: str) -> None:
        self.peft_config.pop(name, None)
        self._trainable.pop(name, None)
        self._applied.pop(name, None)
        if name in self.prompt_encoder:
            del self.prompt_encoder[name]
        remaining = [a for a in self._active if a != name]
        self._active = remaining or sorted(self.peft_config)[:1]
        self._refresh_trainability()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Activate ``adapter_name`` (one adapter: virtual tokens of several adapters are not combined).

        Trainability as for ``TunerModel.set_adapter``: each adapter keeps its own unless ``inference_mode`` is given.
        """
        names = self._require([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        if len(names) != 1:
            raise ConfigError("adapter_name", adapter_name, "prompt-learning methods activate exactly one adapter")
        if inference_mode is not None:
            self._trainable[names[0]] = not inference_mode
        self._active = names
        self._refresh_trainability()

    def _refresh_trainability(self) -> None:
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name in self._active and self._trainable.get(name, False))
        for _, wrapper in self.adapter_modules():
            wrapper.set_adapter(self._active, trainable=self._trainable)
            if self._disabled:
                wrapper.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, the first remaining adapter (sorted) becomes active."""
        self._require([adapter_name])
        for _, wrapper in self.adapter_modules():
            wrapper.delete_adapter(adapter_name)
        self._forget(adapter_name)

    def enable_adapter_layers(self) -> None:
        """Route inputs through the active adapter again."""
        self._disabled = False
        for _, wrapper in self.adapter_modules():
            wrapper.enable_adapters(True)
        self._refresh_trainability()

    def disable_adapter_layers(self) -> None:
        """Run the base model unchanged: no virtual tokens, original ``modules_to_save`` modules."""
        self._disabled = True
        for _, wrapper in self.adapter_modules():
            wrapper.enable_adapters(False)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("peft_type", self.peft_type, "add_weighted_adapter supports LoRA-style adapters only")

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str], batch_size: int | None = None) -> Iterator[None]:
        raise ConfigError("adapter_names", list(adapter_names),
                          "mixed batches are not supported for prompt-learning adapters; run one adapter per batch")
        yield  # pragma: no cover

    # ------------------------------------------------------------------ merging (not possible)
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise MergeError(f"{self.peft_type} adapters are prompt-learning adapters, which cannot be merged into the "
                         "base weights")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise MergeError(f"{self.peft_type} adapters are prompt-learning adapters, which cannot be merged into the "
                         "base weights; use unload() to get the base model back")

    def unmerge_adapter(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> nn.Module:
        """The base model without ``modules_to_save`` wrappers (original modules back) and without ``peft_config``."""
        for name, wrapper in list(self.adapter_modules()):
            set_submodule(self.model, name, wrapper.original_module)
        if "peft_config" in self.model.__dict__:
            del self.model.__dict__["peft_config"]
        return self.model

    # ------------------------------------------------------------------ routing
    def _routing(self) -> tuple[PromptLearningConfig, str] | None:
        """``(config, routing)`` of the active adapter, None while disabled."""
        if self._disabled or not self._active:
            return None
        config = self.peft_config[self._active[0]]
        assert isinstance(config, PromptLearningConfig)
        return config, str(get_method(str(config.peft_type)).prompt_routing)

    def _encoder(self) -> VirtualTokenEncoder:
        return self.prompt_encoder[self._active[0]]

    def prompts(self, rows: int) -> torch.Tensor:
        """The active adapter's virtual-token embeddings: ``(rows, nvt * num_transformer_submodules, token_dim)``."""
        out = self._encoder().output()
        return out.unsqueeze(0).expand(rows, *out.shape)

    def prefix_key_values(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``(rows, heads, nvt, head_dim)``, in the base model's dtype."""
        config = self.peft_config[self._active[0]]
        assert isinstance(config, PromptLearningConfig) and config.num_layers and config.token_dim
        past = self._encoder().output()
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            past = past.to(dtype)
        past = past.unsqueeze(0).expand(rows, *past.shape)
        return split_prefix(past, config.num_layers, int(config.num_attention_heads or 1), config.token_dim,
                            int(config.num_transformer_submodules or 1))

    def prefix_cache(self, rows: int, encoder_decoder: bool, replayable: bool = False) -> Any:
        """The transformers cache holding the active adapter's prefix (see ``cache.py``)."""
        from .cache import prefix_cache

        return prefix_cache(lambda: self.prefix_key_values(rows), encoder_decoder, replayable)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.word_embeddings is None:
            raise ConfigError("input_ids", "a tensor", "the model's word embeddings were not found; pass inputs_embeds")
        return self.word_embeddings(input_ids)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional arguments named after the model's ``forward`` parameters."""
        if not args:
            return dict(kwargs)
        names = [p.name for p in inspect.signature(self.model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(names):
            raise TypeError(f"{type(self.model).__name__}.forward takes {len(names)} positional arguments")
        bound = dict(zip(names, args))
        duplicate = sorted(set(bound) & set(kwargs))
        if duplicate:
            raise TypeError(f"got multiple values for argument(s) {duplicate}")
        return {**bound, **kwargs}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model with the active adapter's virtual tokens (the model's own inputs while disabled)."""
        kwargs = self._bind(args, kwargs)
        kwargs.pop("task_ids", None)
        state = self._routing()
        if state is None:
            return self.model(**kwargs)
        config, routing = state
        rule = task_rule(config.task_type)
        nvt = int(config.num_virtual_tokens or 0)
        if routing != _PREFIX:
            return self.model(**route_embeddings(kwargs, rule, self.prompts, nvt, self._embed))
        layers = self._checkpointed_layers()
        cache = self.prefix_cache(batch_size(kwargs), rule.encoder_decoder, replayable=bool(layers))
        try:
            with _cache_through_checkpoints(layers):
                out = self.model(**route_prefix(kwargs, rule, cache, nvt))
        except Exception as exc:
            if layers:
                _check_prefix_used(cache, exc)
            raise
        if layers:
            _check_prefix_used(cache)
        return out

    def _checkpointed_layers(self) -> list[nn.Module]:
        """Modules running with gradient checkpointing now (training mode); empty when checkpointing is off."""
        if not self.model.training:
            return []
        return [m for m in self.model.modules() if getattr(m, "gradient_checkpointing", False) is True]

    # ------------------------------------------------------------------ generation
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the model with the active adapter's virtual tokens injected at prefill."""
        kwargs.pop("task_ids", None)
        state = self._routing()
        if state is None:
            return self.model.generate(*args, **kwargs)
        config, routing = state
        if routing != _PREFIX and task_rule(config.task_type).encoder_decoder:
            return self.model.generate(**self._encoder_inputs(args, kwargs, int(config.num_virtual_tokens or 0)))
        with self._patched_prepare():
            return self.model.generate(*args, **kwargs)

    def _encoder_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], nvt: int) -> dict[str, Any]:
        """Encoder-decoder generate with prompt tuning / P-tuning: the encoder input gets the virtual tokens."""
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        if kwargs.pop("encoder_outputs", None) is not None:
            warnings.warn("`encoder_outputs` cannot carry the virtual tokens; ignoring them and running the encoder",
                          PeftWarning, stacklevel=3)
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if ids is None:
                raise ConfigError("input_ids", None, "generate with a prompt-learning adapter needs input_ids or "
                                  "inputs_embeds")
            embeds = self._embed(ids)
        virtual = self.prompts(embeds.shape[0])[:, :nvt].to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
        kwargs.pop("position_ids", None)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = prepend_mask(kwargs["attention_mask"], nvt)
        return kwargs

    @contextlib.contextmanager
    def _patched_prepare(self) -> Iterator[None]:
        """Make ``model.generate`` call :meth:`prepare_inputs_for_generation` (as the reference does)."""
        previous = self.model.__dict__.get("prepare_inputs_for_generation")
        self.model.__dict__["prepare_inputs_for_generation"] = self.prepare_inputs_for_generation
        try:
            yield
        finally:
            if previous is None:
                self.model.__dict__.pop("prepare_inputs_for_generation", None)
            else:
                self.model.__dict__["prepare_inputs_for_generation"] = previous

    def prepare_inputs_for_generation(
        self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The model's ``prepare_inputs_for_generation`` plus the virtual tokens: at prefill (empty cache) the prompts
        are prepended to the input embeddings, or the prefix cache becomes the past; every step's 2-D attention mask
        gains the ``nvt`` virtual positions. (``inputs_embeds`` is named so that ``generate`` accepts them.)"""
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        base = type(self.model).prepare_inputs_for_generation
        inputs = base(self.model, *args, **kwargs)
        state = self._routing()
        if state is None:
            return inputs
        config, routing = state
        rule = task_rule(config.task_type)
        nvt = int(config.num_virtual_tokens or 0)
        cache = inputs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        if routing == _PREFIX:
            key = "decoder_input_ids" if rule.encoder_decoder else "input_ids"
            if prefill or kwargs.get("use_cache") is False:
                inputs["past_key_values"] = self.prefix_cache(batch_size(inputs, key), rule.encoder_decoder)
            mask_key = "decoder_attention_mask" if rule.encoder_decoder else "attention_mask"
            inputs[mask_key] = prepend_mask(inputs.get(mask_key), nvt)
            if inputs.get("position_ids") is not None:
                inputs["position_ids"] = inputs["position_ids"] + nvt
            return inputs
        inputs["attention_mask"] = prepend_mask(inputs.get("attention_mask"), nvt)
        inputs.pop("position_ids", None)  # the model counts positions from the cache, which holds the virtual tokens
        if prefill:
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                embeds = self._embed(inputs["input_ids"])
            virtual = self.prompts(embeds.shape[0])[:, :nvt].to(embeds.dtype)
            inputs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
            inputs["input_ids"] = None
        return inputs


@contextlib.contextmanager
def _cache_through_checkpoints(layers: list[nn.Module]) -> Iterator[None]:
    """Let transformers' checkpointed layers keep ``past_key_values`` (they drop it by default because a cache that
    grows would be updated twice); safe for the replayable prefix cache, whose ``update`` stores nothing.

    Models whose outer module drops the cache itself when checkpointing (GPT-2 passes ``None`` to its blocks) get
    that module's flag switched off for the call; the blocks still checkpoint themselves."""
    flagged = [m for m in layers if hasattr(type(m), "_can_checkpoint_with_cache")]
    # only modules that contain checkpointed layers; modules inside one (T5Attention) must keep their flag, or the
    # recomputation in backward would take another code path than the forward
    inner = {id(sub) for f in flagged for sub in f.modules() if sub is not f}
    outer = [m for m in layers if not hasattr(type(m), "_can_checkpoint_with_cache") and id(m) not in inner]
    outer = outer if flagged else []
    for module in flagged:
        module._can_checkpoint_with_cache = True
    for module in outer:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.__dict__.pop("_can_checkpoint_with_cache", None)
        for module in outer:
            module.gradient_checkpointing = True


def _check_prefix_used(cache: Any, error: Exception | None = None) -> None:
    """Raise when a checkpointed forward never read the prefix (the model drops caches under checkpointing)."""
    from .cache import prefix_updates

    if prefix_updates(cache) == 0:
        raise ConfigError(
            "gradient_checkpointing", True,
            "this model drops past_key_values under gradient checkpointing, so the prefix would be ignored; "
            "disable gradient checkpointing (model.gradient_checkpointing_disable()) for prefix tuning on this model",
        ) from error
