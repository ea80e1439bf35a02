"""Tiny models for the LoRA target kinds of issue 18, run by the conformance suite beside ``models.TASK_CASES``:
grouped convolutions (``groups > 1``, Conv1d/2d/3d), ``nn.MultiheadAttention`` (``in_proj_weight`` and
``out_proj``), and LoRA on the 3-D expert parameters of a transformers MoE model (``target_parameters``).

They are not in ``models.TASK_CASES`` because only LoRA adapts them, and each refuses some LoRA options as the
reference does (:data:`REFUSED`): the suite runs the configs a case accepts and checks that the others raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from models import TaskCase, _ids, _seeded_build
from torch import nn

#: base groups of every convolution of :class:`GroupedConvModel` (every example rank is divisible by it)
GROUPS = 2


class GroupedConvModel(nn.Module):
    """Conv1d, Conv2d and Conv3d, each with ``groups=2``; ``x: (B, 4, 6) -> (B, 4 * 6 + 4 * 6 * 3 + 4 * 6 * 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 4, 3, padding=1, groups=GROUPS)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=GROUPS)
        self.c3 = nn.Conv3d(4, 4, 1, groups=GROUPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.c1(x)  # (B, 4, L)
        h2 = self.c2(h1.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous())  # (B, 4, L, 3)
        h3 = self.c3(h2.unsqueeze(-1))  # (B, 4, L, 3, 1)
        return torch.cat([h1.flatten(1), h2.flatten(1), h3.flatten(1)], dim=1)


class MHAModel(nn.Module):
    """Linear -> MultiheadAttention (E=8, 2 heads, batch first) -> Linear; ``x: (B, 5, 8) -> (B, 5, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        attended, _ = self.attn(h, h, h, need_weights=False)
        return self.head(attended)


def _tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def gconv_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": _tensor((batch_size, 4, 6), 5)}


def mha_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": _tensor((batch_size, 5, 8), 6)}


#: vocabulary of ``moe_models`` (64)
MOE_VOCAB = 64


def moe_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids = _ids(batch_size, high=MOE_VOCAB)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_moe() -> nn.Module:
    """Qwen3-MoE (4 experts, top-2; experts as 3-D ``gate_up_proj`` / ``down_proj`` parameters)."""
    from moe_models import moe_model

    return moe_model("qwen3_moe")


KIND_CASES: list[TaskCase] = [
    TaskCase("custom-gconv", None, _seeded_build(GroupedConvModel), gconv_inputs, ["c1", "c2", "c3"],
             output_key=None),
    TaskCase("custom-mha", None, _seeded_build(MHAModel), mha_inputs, ["attn"], output_key=None),
    TaskCase("moe-params", "CAUSAL_LM", tiny_moe, moe_inputs, []),
]

#: module kinds of each case's targets (``conformance_helpers.CASE_TARGET_KINDS``); ``"grouped_conv"`` and
#: ``"parameter"`` are not ``module_kind`` values: they keep methods that only list ``"conv"`` (or no parameter
#: support) away from these cases
KIND_CASE_KINDS: dict[str, frozenset[str]] = {
    "custom-gconv": frozenset({"conv", "grouped_conv"}),
    "custom-mha": frozenset({"multihead_attention"}),
    "moe-params": frozenset({"parameter"}),
}

#: config fields each case sets besides ``target_modules`` (the MoE case adapts parameters, not modules)
CASE_CONFIG_KWARGS: dict[str, dict[str, Any]] = {
    "moe-params": {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
}

#: cases whose adapters cannot be merged (the reference raises; peftkit's ``GroupedConvMergeError``)
UNMERGEABLE: frozenset[str] = frozenset({"custom-gconv"})


def _refused_gconv(kwargs: dict[str, Any]) -> str | None:
    return "use_dora" if kwargs.get("use_dora") else None


def _refused_params(kwargs: dict[str, Any]) -> str | None:
    """``lora.ParamWrapper``'s rules: no dropout (x cannot be factored out), no DoRA, inits True/False/gaussian."""
    if kwargs.get("lora_dropout", 0.0):
        return "lora_dropout"
    if kwargs.get("use_dora"):
        return "use_dora"
    return None


#: case -> (config kwargs -> the config field the reference refuses on this case, or None)
REFUSED: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "custom-gconv": _refused_gconv,
    "custom-mha": _refused_gconv,  # DoRA on MultiheadAttention is refused too
    "moe-params": _refused_params,
}


#: LoRA variants that adapt some module kinds only (MonteCLoRA, BD-LoRA, VeLoRA, KaSA) are refused on the other
#: cases through ``MethodSpec.example_kinds`` (``conformance_helpers.refused_field``)

#: cases whose adapter layers' outputs are not affine in the adapted weights, so "both active = base + delta_a +
#: delta_b" holds for their weights but not layer by layer (the model-level checks still run)
NOT_LAYERWISE_ADDITIVE: dict[str, str] = {
    "custom-mha": "softmax(q k^T) of the adapted in_proj; out_proj runs inside the attention's functional call",
    "moe-params": "the experts' activation between the adapted gate_up_proj and down_proj",
}
