"""``PromptLearningConfig`` (the fields shared by prompt tuning, P-tuning and prefix tuning) and
:func:`resolve_prompt_config`, which fills the unset fields from a model config without touching the user's object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import PeftConfig, check, is_int
from ...errors import ConfigError
from ...types import TaskType

#: model-config keys read for each unset field, first existing key wins (the reference's order)
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer")
_DIM_KEYS = ("hidden_size", "n_embd", "d_model")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (the reference's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: number of virtual tokens ``nvt`` (required before the adapter is built).
        token_dim: hidden size of the base model's token embeddings; from the model config when None.
        num_transformer_submodules: 2 for encoder-decoder models (``SEQ_2_SEQ_LM``), else 1; filled when None.
        num_attention_heads: attention heads (key/value heads for prefix tuning on GQA models); filled when None.
        num_layers: transformer layers; filled when None.
        modules_to_save: extra modules trained in full and saved with the adapter (task heads are added for
            ``SEQ_CLS`` / ``TOKEN_CLS``).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= 1), name, value, "allowed: None or an int >= 1")
        check(self.num_transformer_submodules in (None, 1, 2), "num_transformer_submodules",
              self.num_transformer_submodules, "allowed: None, 1 or 2")
        check(
            self.modules_to_save is None or (not isinstance(self.modules_to_save, str)
                                              and all(isinstance(m, str) for m in self.modules_to_save)),
            "modules_to_save", self.modules_to_save, "allowed: None or a list of module names",
        )

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _first(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in data:
            return data[key]
    return None


def _config_dict(model_config: Any) -> dict[str, Any]:
    """The model config as a dict (its ``text_config`` for vision-language models), ``{}`` when there is none."""
    if model_config is None:
        return {}
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    text = data.get("text_config")
    return dict(text) if isinstance(text, dict) else data


def resolve_prompt_config(
    config: PromptLearningConfig, model_config: Any, task_type: TaskType | str | None, kv_prefix: bool = False
) -> dict[str, Any]:
    """The values to fill into ``config`` for a model with ``model_config`` (a transformers config, a dict or None).

    Pure: returns ``{field: value}`` and modifies nothing. Unset fields come from the first existing model-config
    key, as in the reference: ``num_layers`` from ``num_hidden_layers`` / ``num_layers`` / ``n_layer``;
    ``token_dim`` from ``hidden_size`` / ``n_embd`` / ``d_model``; ``num_attention_heads`` from
    ``num_attention_heads`` / ``n_head`` / ``num_heads`` / ``encoder_attention_heads``;
    ``num_transformer_submodules`` is 2 for ``SEQ_2_SEQ_LM``, else 1. With ``kv_prefix`` (prefix tuning) on a
    grouped-query-attention model the prefix is sized for the key/value heads: ``num_attention_heads =
    num_key_value_heads`` and ``token_dim = head_dim * num_key_value_heads`` (this overrides given values, as the
    reference does). ``encoder_hidden_size`` (when the config has that field and it is None) becomes ``token_dim``.

    Raises:
        ConfigError: ``num_virtual_tokens`` is None, or a field is unset and the model config does not provide it.
    """
    check(config.num_virtual_tokens is not None, "num_virtual_tokens", None, "allowed: an int >= 1 (required)")
    data = _config_dict(model_config)
    out: dict[str, Any] = {}
    num_layers = config.num_layers
    if num_layers is None:
        num_layers = getattr(model_config, "num_hidden_layers", None) if model_config is not None else None
        num_layers = num_layers if is_int(num_layers) else _first(data, _LAYER_KEYS)
    token_dim = config.token_dim if config.token_dim is not None else _first(data, _DIM_KEYS)
    heads = config.num_attention_heads if config.num_attention_heads is not None else _first(data, _HEAD_KEYS)
    for name, value in (("num_layers", num_layers), ("token_dim", token_dim), ("num_attention_heads", heads)):
        if value is None:
            raise ConfigError(name, None, f"the model config does not provide it; set {name} in the config")
    if kv_prefix and data.get("num_key_value_heads") is not None:
        kv_heads = data["num_key_value_heads"]
        head_dim = data.get("global_head_dim") or data.get("head_dim") or token_dim // heads
        if data.get("global_head_dim"):
            kv_heads = data.get("num_global_key_value_heads") or kv_heads
        token_dim, heads = head_dim * kv_heads, kv_heads
    out.update(num_layers=num_layers, token_dim=token_dim, num_attention_heads=heads)
    if config.num_transformer_submodules is None:
        out["num_transformer_submodules"] = 2 if str(task_type) == TaskType.SEQ_2_SEQ_LM.value else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:  # type: ignore[attr-defined]
        out["encoder_hidden_size"] = token_dim
    return {k: v for k, v in out.items() if getattr(config, k) != v}
