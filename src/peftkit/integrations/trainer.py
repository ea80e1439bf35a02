"""transformers ``Trainer`` glue: adapter-only checkpoints, ``resume_from_checkpoint`` and ``load_best_model_at_end``.

A peftkit ``PeftModel`` trains and evaluates with an unmodified ``transformers.Trainer`` (it exposes the wrapped
model's forward signature, label names, class name and checkpointing hooks; see ``peftkit.model_surface``). What
``Trainer`` does only for ``isinstance(model, peft.PeftModel)`` is the checkpoint handling: without this glue every
checkpoint holds the full model (``model.safetensors``) and resume/load-best load it. Mix
:class:`AdapterTrainerMixin` in front of any trainer class to get the reference's behaviour::

    from peftkit.integrations import AdapterTrainer            # = AdapterTrainerMixin + transformers.Trainer
    trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=ds, eval_dataset=ds_eval)

    class MyTrainer(AdapterTrainerMixin, Seq2SeqTrainer): ...  # any Trainer subclass, TRL's included
    MyTrainer = make_adapter_trainer(Seq2SeqTrainer)           # the same, built for you

Each checkpoint then holds ``adapter_config.json`` + ``adapter_model.safetensors`` (the ``default`` adapter at the
top, other adapters in ``<checkpoint>/<name>/``, as ``save_pretrained`` writes them) beside the trainer's
optimizer/scheduler/RNG state; resume and load-best copy the saved tensors into the model's existing adapters in
place (so the optimizer keeps pointing at the same parameters). The mixin also recognises a plain model whose
layers carry peftkit adapters (``inject_adapter_in_model`` or ``peftkit.integrations.add_adapter``); any other
model falls through to the trainer's own code. The overridden methods (``_save``, ``_load_from_checkpoint``,
``_load_best_model``) are private ``Trainer`` methods: tested with transformers 5.23 and TRL 1.16.

TRL trainers patch the forward of the model they are given (``add_fused_lm_head`` looks up ``model.base_model``
as the transformers *backbone*; on a ``PeftModel`` that name is the tuner). For a TRL trainer class the mixin
therefore hands TRL the wrapped transformers model (adapters already inside its layers), so TRL patches that, and
sets ``trainer.model`` back to the ``PeftModel`` afterwards; see ``peftkit.integrations.trl``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from ..config import PeftConfig
from ..errors import AdapterLoadError, ConfigError
from ..layers.base import AdapterLayer
from ..mapping import get_peft_model
from ..peft_model import PeftModel
from ..serialization.files import (
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_peft_weights,
    save_adapter_files,
)
from ..serialization.state_dict import WRAPPER_PREFIX, get_peft_model_state_dict, set_peft_model_state_dict
from ..tuner import TunerModel

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"

# ``AdapterTrainer`` and ``AdapterSeq2SeqTrainer`` are built on first access (module ``__getattr__``)
__all__ = [
    "AdapterTrainerMixin",
    "find_adapter_model",
    "load_adapter_checkpoint",
    "make_adapter_trainer",
    "save_adapter_checkpoint",
]


# ---------------------------------------------------------------------------------------------------- models
def _unwrap(model: nn.Module) -> nn.Module:
    """``model`` without DDP / ``torch.compile`` / accelerate wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if isinstance(getattr(model, "module", None),
                                                                                  nn.Module) else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find_adapter_model(model: nn.Module | None) -> nn.Module | None:
    """The peftkit model a trainer holds: a ``PeftModel``, or a plain model whose layers carry peftkit adapters
    (it has a ``peft_config`` dict). None for anything else (DDP/compile wrappers are looked through)."""
    if model is None:
        return None
    model = _unwrap(model)
    if isinstance(model, PeftModel):
        return model
    configs = model.__dict__.get("peft_config")
    if isinstance(configs, dict) and configs and any(isinstance(m, AdapterLayer) for m in model.modules()):
        return model
    return None


def _adapter_dir(directory: str, adapter_name: str) -> str:
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _has_weights(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME))


def save_adapter_checkpoint(
    model: nn.Module,
    output_dir: str,
    state_dict: dict[str, Any] | None = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
) -> None:
    """Write every adapter of ``model`` (a ``PeftModel`` or a plain model with injected adapters) to ``output_dir``:
    ``default`` at the top, others in ``<output_dir>/<name>/``, keys ``base_model.model.<path>...`` either way.

    ``state_dict``: values gathered by the trainer (keys relative to ``model``), used instead of the live tensors.
    """
    if isinstance(model, PeftModel):
        model.save_pretrained(output_dir, safe_serialization=safe_serialization, state_dict=state_dict,
                              is_main_process=is_main_process)
        return
    if not is_main_process:
        return
    for name, config in model.peft_config.items():  # type: ignore[union-attr]
        target = _adapter_dir(output_dir, name)
        tensors = get_peft_model_state_dict(model, state_dict, name, save_embedding_layers=False)
        save_adapter_files(target, config, {WRAPPER_PREFIX + k: v for k, v in tensors.items()}, safe_serialization)


def load_adapter_checkpoint(model: nn.Module, checkpoint_dir: str) -> list[str]:
    """Copy the adapter tensors saved in ``checkpoint_dir`` (by :func:`save_adapter_checkpoint`) into ``model``'s
    adapters of the same names, in place. Returns the names loaded.

    Raises :class:`AdapterLoadError` when the directory holds no adapter of this model, and (from
    ``set_peft_model_state_dict``) :class:`ShapeMismatchError` before writing anything when shapes differ.
    """
    configs: dict[str, PeftConfig] = model.peft_config  # type: ignore[assignment]
    found = [name for name in configs if _has_weights(_adapter_dir(checkpoint_dir, name))]
    if not found:
        raise AdapterLoadError(
            f"checkpoint {checkpoint_dir!r} holds no weights for the adapters {sorted(configs)} of this model "
            f"(looked for {SAFETENSORS_WEIGHTS_NAME} / {WEIGHTS_NAME}, 'default' at the top, others in subfolders)"
        )
    for name in found:
        weights = load_peft_weights(_adapter_dir(checkpoint_dir, name))
        set_peft_model_state_dict(model, weights, name)
    return found


# ---------------------------------------------------------------------------------------------------- the mixin
def _is_trl(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "trl" for c in cls.__mro__)


class AdapterTrainerMixin:
    """Put before a ``transformers.Trainer`` class (``class T(AdapterTrainerMixin, Trainer)``) to save, resume and
    load-best adapter-only checkpoints of peftkit models; other models go through the trainer's own code.

    Also accepts ``peft_config=<peftkit config>`` with a model object (the model is wrapped with
    ``get_peft_model`` first), as TRL's trainers accept a ``peft.PeftConfig``.

    Attributes:
        pass_base_model: hand the parent trainer the wrapped transformers model instead of the ``PeftModel`` (and
            set ``trainer.model`` back afterwards). None (default): True for TRL trainers, whose fused LM head
            patches the given model's forward and needs ``model.base_model`` to be the transformers backbone.
    """

    pass_base_model: bool | None = None

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any) -> None:
        model = self._wrap_with_peft_config(model, kwargs)
        wrapper = model if isinstance(model, PeftModel) else None
        self._peftkit_model: PeftModel | None = wrapper
        hand_base = self.pass_base_model if self.pass_base_model is not None else _is_trl(type(self))
        if wrapper is not None and hand_base:
            if not isinstance(wrapper.base_model, TunerModel):
                raise ConfigError(
                    "model", f"{type(wrapper).__name__} with {wrapper.peft_type}",
                    f"{type(self).__name__} patches the transformers model's forward (TRL's fused LM head), which "
                    "would bypass the virtual tokens of a prompt-learning adapter; allowed: an adapter injected into "
                    "layers (LoRA, IA3, LoHa, LoKr, ...), or train prompt learning with transformers.Trainer",
                )
            model = wrapper.get_base_model()
        super().__init__(model, *args, **kwargs)  # type: ignore[call-arg]
        if wrapper is not None and model is not wrapper:
            self._restore_wrapper(wrapper)

    def _wrap_with_peft_config(self, model: Any, kwargs: dict[str, Any]) -> Any:
        config = kwargs.get("peft_config")
        if not isinstance(config, PeftConfig):
            return model
        kwargs.pop("peft_config")
        if not isinstance(model, nn.Module) or isinstance(model, PeftModel):
            raise ConfigError("model", type(model).__name__, "with a peftkit peft_config, allowed: a model object "
                              "without adapters (load it first, e.g. AutoModelForCausalLM.from_pretrained)")
        return get_peft_model(model, config)

    def _restore_wrapper(self, wrapper: PeftModel) -> None:
        """Make ``trainer.model`` the ``PeftModel`` again after the parent trainer was built on its inner model."""
        self.model = self.model_wrapped = wrapper
        handler = getattr(self, "callback_handler", None)
        if handler is not None:
            handler.model = wrapper

    # ------------------------------------------------------------------ checkpoints
    def _adapter_model(self, model: nn.Module | None = None) -> nn.Module | None:
        if model is None and self._peftkit_model is not None:
            return self._peftkit_model
        return find_adapter_model(model if model is not None else self.model)  # type: ignore[attr-defined]

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        adapter_model = self._adapter_model()
        if adapter_model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving adapter checkpoint to %s", output_dir)
        save_adapter_checkpoint(adapter_model, output_dir, state_dict=state_dict,
                                safe_serialization=getattr(args, "save_safetensors", True))
        processing_class = getattr(self, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        import torch

        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapter_model = self._adapter_model(model)
        if adapter_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        names = load_adapter_checkpoint(adapter_model, resume_from_checkpoint)
        logger.info("Resumed adapters %s from %s", names, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        adapter_model = self._adapter_model()
        if adapter_model is None:
            return super()._load_best_model()  # type: ignore[misc]
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        names = load_adapter_checkpoint(adapter_model, best)
        logger.info("Loaded best adapters %s from %s (score: %s)", names, best,
                    self.state.best_metric)  # type: ignore[attr-defined]


def make_adapter_trainer(trainer_cls: type) -> type:
    """``class Adapter<Name>(AdapterTrainerMixin, trainer_cls)`` for any ``Trainer`` subclass."""
    if issubclass(trainer_cls, AdapterTrainerMixin):
        return trainer_cls
    return type(f"Adapter{trainer_cls.__name__}", (AdapterTrainerMixin, trainer_cls),
                {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} with adapter-only checkpoints "
                 "(:class:`AdapterTrainerMixin`)."})


def __getattr__(name: str) -> Any:
    """``AdapterTrainer`` / ``AdapterSeq2SeqTrainer`` import transformers' trainers on first use."""
    if name in ("AdapterTrainer", "AdapterSeq2SeqTrainer"):
        import transformers

        cls = make_adapter_trainer(getattr(transformers, name.removeprefix("Adapter")))
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
