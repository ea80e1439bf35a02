"""Running AdaLoRA's rank allocation without remembering ``update_and_allocate``.

The reference makes users call ``model.base_model.update_and_allocate(step)`` after every ``optimizer.step()`` and
before ``zero_grad()``; forgetting it silently trains a plain LoRA of rank ``init_r``. peftkit offers:

- :func:`attach_adalora` ``(model, optimizer)``: an optimizer step post-hook that counts steps and calls
  ``update_and_allocate`` (any training loop, including accelerate's wrapped optimizers and transformers' Trainer);
- ``AdaLoraCallback``: a transformers ``TrainerCallback`` that does it on ``on_optimizer_step`` (after the optimizer
  step, before the Trainer zeroes the gradients). transformers is imported only when the class is first used.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError


def _allocating(model: Any) -> Any:
    """The object whose ``update_and_allocate`` runs the allocation: a PeftModel's tuner, or the tuner itself."""
    for candidate in (model, getattr(model, "base_model", None)):
        if callable(getattr(type(candidate), "update_and_allocate", None)):
            return candidate
    raise ConfigError("model", type(model).__name__,
                      "allowed: a PeftModel (or AdaLoraModel) holding an AdaLoRA adapter")


class AdaLoraStepHook:
    """Handle returned by :func:`attach_adalora`: ``global_step`` is the number of optimizer steps seen so far;
    ``remove()`` detaches the hook."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, start_step: int = 0) -> None:
        self.tuner = _allocating(model)
        self.global_step = start_step
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.global_step += 1
        self.tuner.update_and_allocate(self.global_step)

    def remove(self) -> None:
        """Stop calling ``update_and_allocate``."""
        self._handle.remove()


def attach_adalora(model: Any, optimizer: torch.optim.Optimizer, start_step: int = 0) -> AdaLoraStepHook:
    """Call ``update_and_allocate(step)`` after every ``optimizer.step()`` (``step`` = 1, 2, ...; resuming:
    ``start_step`` steps already done). Gradients are still present then, as the allocation needs.

    Example::

        hook = attach_adalora(peft_model, optimizer)
        for batch in loader:
            peft_model(**batch).loss.backward()
            optimizer.step()        # the rank allocation runs here
            optimizer.zero_grad()
        hook.remove()
    """
    return AdaLoraStepHook(model, optimizer, start_step)


def _build_callback() -> type:
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):  # type: ignore[misc]
        """Runs AdaLoRA's ``update_and_allocate(state.global_step + 1)`` after each Trainer optimizer step (before
        the gradients are zeroed). Pass it in ``Trainer(..., callbacks=[AdaLoraCallback()])``."""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            tuner = _allocating(model)
            configs = [tuner.peft_config[a] for a in tuner.active_adapters]
            for config in configs:
                if state.max_steps and config.total_step != state.max_steps:
                    import warnings

                    from ...errors import PeftWarning

                    warnings.warn(f"AdaLoRA total_step={config.total_step} but the Trainer runs {state.max_steps} "
                                  "steps; the rank budget schedule assumes total_step", PeftWarning, stacklevel=2)

        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            _allocating(model).update_and_allocate(state.global_step + 1)

    AdaLoraCallback.__module__ = __name__
    AdaLoraCallback.__qualname__ = "AdaLoraCallback"
    return AdaLoraCallback


def __getattr__(name: str) -> Any:
    if name == "AdaLoraCallback":
        cls = _build_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
