"""Machinery shared by the prompt-learning methods (prompt tuning, P-tuning, prefix tuning); not a method itself.

``config.py``: ``PromptLearningConfig`` and the pure ``resolve_prompt_config``; ``tuner.py``: ``PromptTuner``, the
prompt-learning counterpart of ``TunerModel``; ``routing.py``: how a task forward's inputs become the base model's
(virtual tokens, masks, labels, the key/value prefix); ``cache.py``: the transformers caches carrying the prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ...config import PeftConfig
from ...errors import UnsupportedModuleError
from ...registry import MethodSpec
from ...types import PeftType
from .config import PromptLearningConfig, resolve_prompt_config


def _no_layers(*args: Any) -> Any:
    raise UnsupportedModuleError("prompt-learning methods do not inject adapter layers into modules")


def prompt_method_spec(
    peft_type: PeftType,
    config_cls: type[PeftConfig],
    tuner_name: str,
    encoder: Callable[[PeftConfig, nn.Module | None], nn.Module],
    routing: str,
    example_configs: Sequence[dict[str, Any]] = (),
) -> MethodSpec:
    """The registry entry of a prompt-learning method: ``kind="prompt"``, not identity at init, not mergeable."""
    return MethodSpec(
        peft_type=peft_type,
        prefix="",
        config_cls=config_cls,
        tuner_name=tuner_name,
        create_layer=_no_layers,
        layer_options=_no_layers,
        default_targets=lambda model_type: None,
        identity_at_init=False,
        mergeable=False,
        example_configs=tuple(example_configs),
        kind="prompt",
        prompt_encoder=encoder,
        prompt_routing=routing,
    )


__all__ = ["PromptLearningConfig", "prompt_method_spec", "resolve_prompt_config"]
