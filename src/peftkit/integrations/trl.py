"""TRL trainers with peftkit models.

The one-line recipe: use ``AdapterSFTTrainer`` where you would use ``trl.SFTTrainer`` and pass the ``PeftModel``
(or the plain model plus ``peft_config=<peftkit config>``)::

    from peftkit import LoraConfig, get_peft_model
    from peftkit.integrations.trl import AdapterSFTTrainer

    trainer = AdapterSFTTrainer(model=get_peft_model(model, LoraConfig(...)), args=SFTConfig(...),
                                train_dataset=ds, processing_class=tokenizer)
    trainer.train()                         # checkpoints: adapter_config.json + adapter_model.safetensors

Why the plain ``SFTTrainer(model=peft_model)`` fails: TRL recognises only ``peft.PeftModel`` (``isinstance``) and
otherwise patches the forward of the object it was given with its fused LM head, which calls
``self.base_model(...)`` and reads ``.last_hidden_state`` (the transformers meaning of ``base_model``: the
backbone). On a ``PeftModel`` -- peftkit's and the reference's alike -- ``base_model`` is the tuner, which returns
the full model's output (``AttributeError: ... no attribute 'last_hidden_state'``). peftkit keeps the reference's
``model.base_model`` API; instead :class:`~peftkit.integrations.trainer.AdapterTrainerMixin` gives TRL the wrapped
transformers model (adapters already injected in its layers, so they train), lets TRL patch *that* model, and sets
``trainer.model`` back to the ``PeftModel``, whose forward passes TRL's extra arguments (``fused_lm_head=True``)
through to the patched model. Checkpoints are adapter-only, resume and load-best restore the adapter.

Without the mixin, ``trl.SFTTrainer(model=peft_model.get_base_model(), ...)`` also trains the adapter, but its
checkpoints hold the full model; save the adapter with ``peft_model.save_pretrained(dir)`` afterwards.

What is lost compared with the reference (TRL tests ``isinstance(model, peft.PeftModel)``): ``peft_config=`` needs
this mixin (TRL itself raises ``TypeError`` for a non-``peft`` config); DPO/KTO/GRPO/RLOO cannot use the adapter-
disabled model as the reference model, so they build a separate reference model (about twice the memory); TRL's
QLoRA adapter casting to bfloat16 and its DeepSpeed ZeRO-3 re-entrant checkpointing fix are not applied.
Prompt-learning adapters (prompt/prefix tuning, P-tuning) are refused by the mixin for TRL trainers (TRL's patched
forward would bypass the virtual tokens); train them with ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any

from .trainer import AdapterTrainerMixin, make_adapter_trainer

# ``AdapterSFTTrainer`` is built on first access (module ``__getattr__``)
__all__ = ["AdapterTrainerMixin", "make_adapter_trainer"]

_TRL_TRAINERS = {"AdapterSFTTrainer": "SFTTrainer"}


def __getattr__(name: str) -> Any:
    """``AdapterSFTTrainer`` imports TRL on first use; other TRL trainers: ``make_adapter_trainer(trl.DPOTrainer)``."""
    if name in _TRL_TRAINERS:
        import trl

        cls = make_adapter_trainer(getattr(trl, _TRL_TRAINERS[name]))
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
