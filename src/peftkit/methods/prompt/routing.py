"""How a task forward's keyword inputs become the base model's, for the prompt-learning methods.

Pure functions of tensors and dicts (no modules): the tuner computes the prompts / prefix and calls these.

Conventions (``B`` batch, ``S`` input length, ``nvt`` virtual tokens, ``d`` token_dim):

* ``"embeddings"`` routing (prompt tuning, P-tuning): ``inputs_embeds = cat(prompts: (B, nvt, d), embeds: (B, S, d))``;
  the 2-D ``attention_mask`` gains ``nvt`` leading ones; ``labels`` gain ``nvt`` leading -100 where the outputs are
  per token (CAUSAL_LM, and TOKEN_CLS, whose logits are ``nvt + S`` long: the reference leaves the labels short
  there and the loss fails); QA start/end positions shift by ``nvt``; ``position_ids`` are dropped with a warning.
  Encoder-decoder models: only the encoder input and its mask are prefixed.
* ``"prefix"`` routing (prefix tuning): the inputs keep their length, ``past_key_values`` holds the prefix, the
  2-D ``attention_mask`` (the decoder's for encoder-decoder models) gains ``nvt`` leading ones and
  ``position_ids`` shift by ``nvt``.
* ``token_type_ids`` are kept (zero-prefixed when the input grows) for SEQ_CLS / TOKEN_CLS, else dropped with a
  warning, as in the reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError, PeftWarning

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskRule:
    """What a task does with the inputs beside the embeddings."""

    pad_labels: bool = False  # labels are per token: prepend -100 for the virtual tokens
    keep_token_types: bool = False  # token_type_ids are kept (else dropped with a warning)
    shift_positions: tuple[str, ...] = ()  # index inputs that point into the sequence (QA)
    encoder_decoder: bool = False


TASK_RULES: dict[str, TaskRule] = {
    "CAUSAL_LM": TaskRule(pad_labels=True),
    "SEQ_CLS": TaskRule(keep_token_types=True),
    "TOKEN_CLS": TaskRule(pad_labels=True, keep_token_types=True),
    "QUESTION_ANS": TaskRule(shift_positions=("start_positions", "end_positions")),
    "FEATURE_EXTRACTION": TaskRule(),
    "SEQ_2_SEQ_LM": TaskRule(encoder_decoder=True),
}
_DEFAULT_RULE = TaskRule()


def task_rule(task_type: object) -> TaskRule:
    """The rule of ``task_type`` (a ``TaskType``, its string, or None for a plain ``PeftModel``)."""
    return TASK_RULES.get(str(task_type) if task_type is not None else "", _DEFAULT_RULE)


def batch_size(kwargs: dict[str, Any], key: str = "input_ids") -> int:
    """Rows of ``kwargs[key]`` or of ``inputs_embeds``."""
    for name in (key, "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ConfigError(key, None, "prompt-learning adapters need input_ids or inputs_embeds")


def prepend_mask(mask: torch.Tensor | None, nvt: int) -> torch.Tensor | None:
    """``mask: (B, S)`` -> ``(B, nvt + S)`` with leading ones; None stays None."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ConfigError("attention_mask", f"a {mask.dim()}-D tensor",
                          "prompt-learning adapters extend the mask by the virtual tokens; pass a 2-D (B, S) mask")
    return torch.cat([mask.new_ones(mask.shape[0], nvt), mask], dim=1)


def _prepend_fill(tensor: torch.Tensor, nvt: int, value: int) -> torch.Tensor:
    return torch.cat([tensor.new_full((tensor.shape[0], nvt), value), tensor], dim=1)


def _drop(kwargs: dict[str, Any], key: str, what: str) -> None:
    if kwargs.get(key) is not None:
        warnings.warn(f"{what} are not supported for prompt learning (the virtual tokens shift the sequence). "
                      f"Ignoring {key}.", PeftWarning, stacklevel=4)
    kwargs.pop(key, None)


def route_embeddings(
    kwargs: dict[str, Any],
    rule: TaskRule,
    prompts: Callable[[int], torch.Tensor],
    nvt: int,
    embed: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """Base-model kwargs with the virtual tokens prepended (prompt tuning / P-tuning; see the module docstring).

    ``prompts(B) -> (B, >= nvt, d)``: the virtual-token embeddings (only the first ``nvt`` are used);
    ``embed(input_ids: (B, S)) -> (B, S, d)``: the word embeddings.
    """
    out = dict(kwargs)
    rows = batch_size(out)
    embeds = out.pop("inputs_embeds", None)
    ids = out.pop("input_ids", None)
    if embeds is None:
        embeds = embed(ids)
    virtual = prompts(rows)[:, :nvt].to(embeds.dtype)
    out["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    out["attention_mask"] = prepend_mask(out.get("attention_mask"), nvt)
    _drop(out, "position_ids", "Position ids")
    if rule.encoder_decoder:
        _drop(out, "token_type_ids", "Token type ids")
        return out
    if rule.keep_token_types and out.get("token_type_ids") is not None:
        out["token_type_ids"] = _prepend_fill(out["token_type_ids"], nvt, 0)
    elif not rule.keep_token_types:
        _drop(out, "token_type_ids", "Token type ids")
    if rule.pad_labels and out.get("labels") is not None:
        out["labels"] = _prepend_fill(out["labels"], nvt, -100)
    for key in rule.shift_positions:
        if out.get(key) is not None:
            out[key] = out[key] + nvt
    return out


def route_prefix(kwargs: dict[str, Any], rule: TaskRule, cache: Any, nvt: int) -> dict[str, Any]:
    """Base-model kwargs carrying the key/value prefix ``cache`` (prefix tuning; see the module docstring)."""
    out = dict(kwargs)
    out["past_key_values"] = cache
    mask_key = "decoder_attention_mask" if rule.encoder_decoder else "attention_mask"
    out[mask_key] = prepend_mask(out.get(mask_key), nvt)
    if out.get("position_ids") is not None:
        out["position_ids"] = out["position_ids"] + nvt
    if not rule.keep_token_types:
        _drop(out, "token_type_ids", "Token type ids")
    return out


def split_prefix(
    past: torch.Tensor, num_layers: int, heads: int, token_dim: int, submodules: int
) -> list[KV]:
    """The per-layer ``(keys, values)`` of a prefix, exactly as the reference's ``get_prompt`` slices it.

    ``past: (B, nvt, num_layers * 2 * token_dim)`` is viewed as ``(B, nvt, num_layers * 2, heads, head_dim)``,
    duplicated along the layer axis for encoder-decoder models (``submodules == 2``), permuted to
    ``(num_layers * 2 * submodules, B, heads, nvt, head_dim)`` and split into chunks of ``2 * submodules``; layer
    ``i`` takes the first two entries of chunk ``i`` as keys and values, each ``(B, heads, nvt, head_dim)``.
    """
    rows, nvt = past.shape[:2]
    if token_dim % heads:
        raise ConfigError("token_dim", token_dim, f"must be divisible by num_attention_heads={heads}")
    view = past.view(rows, nvt, num_layers * 2, heads, token_dim // heads)
    if submodules == 2:
        view = torch.cat([view, view], dim=2)
    chunks = view.permute(2, 0, 3, 1, 4).split(2 * submodules)
    return [(chunk[0], chunk[1]) for chunk in chunks]
