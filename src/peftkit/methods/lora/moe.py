"""LoRA targets on transformers 5 mixture-of-experts models, as the reference reads them.

transformers 5 fuses the experts of Mixtral-like and Qwen2-MoE-like models (Qwen3-MoE, OLMoE, DeepSeek-V2/V3,
GLM4-MoE, Qwen3-Next, MiniMax, ...) into 3-D parameters (``experts.gate_up_proj``, ``experts.down_proj``) and turns
the router ``gate`` into a custom module. The reference therefore rewrites a LoRA config on these models before it
injects (every ``get_peft_model``, ``add_adapter`` and load): the names the experts and router had as
``nn.Linear`` s (``gate``, ``gate_proj``/``up_proj``/``down_proj``, or ``w1``/``w3``/``w2``) leave
``target_modules`` and become ``target_parameters`` (``gate.weight``, ``gate_up_proj``, ``down_proj``), with rank
and alpha doubled for ``gate_up_proj`` (two LoRAs fused into one); ``"all-linear"`` and regexes are first resolved to
the leaf names they select, plus those old names. peftkit does the same (:func:`convert_moe_targets`), so adapters
and files agree with the reference's. Linear modules that still carry one of the old names (the dense MLPs of
DeepSeek/GLM4-MoE's first layers, shared experts) are then not adapted, in the reference silently; peftkit warns and
says how to adapt them as well (``target_parameters=["mlp.gate_proj.weight", ...]``, which the reference reads the
same way).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, PeftWarning
from .param import ParamLayer

#: old target name -> fused parameter name, per transformers conversion pattern (the reference's table)
TARGET_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
#: fused parameter -> the old targets fused into it (all or none may be targeted)
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def conversion_pattern(model: nn.Module) -> str | None:
    """``"mixtral"`` or ``"qwen2_moe"`` when ``model``'s type is one transformers converts with that pattern (the
    installed transformers' own table, as the reference reads it), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: nothing is fused
        return None
    pattern = {"mixtral": "mixtral", **_MODEL_TO_CONVERSION_PATTERN}.get(model_type)
    if pattern not in TARGET_MAPPING or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return pattern


def convert_moe_targets(config: PeftConfig, model: nn.Module) -> dict[str, Any]:
    """The config fields the reference's conversion gives ``config`` on ``model`` (``target_modules``,
    ``target_parameters``, ``rank_pattern``, ``alpha_pattern``), or ``{}`` when it leaves the config alone (not a
    converted model type, default targets, nothing to move). Raises :class:`ConfigError` when only one of the
    projections fused into ``gate_up_proj`` is targeted."""
    pattern = conversion_pattern(model)
    targets = getattr(config, "target_modules", None)
    if pattern is None or targets is None:
        return {}
    mapping, fused = TARGET_MAPPING[pattern], FUSED[pattern]
    names = _leaf_names(targets, config, model, mapping) if isinstance(targets, str) else set(targets)
    remaining: set[str] = set()
    parameters = set(getattr(config, "target_parameters", None) or [])
    moved: dict[str, set[str]] = {}
    for target in names:
        old = next((o for o in mapping if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.add(target)
            continue
        parameters.add(mapping[old])
        moved.setdefault(mapping[old], set()).add(old)
    if not moved:
        return {}
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)  # type: ignore[attr-defined]
    for new, required in fused.items():
        present = moved.get(new, set())
        if 0 < len(present) < len(required):
            raise ConfigError("target_modules", sorted(names), f"on {type(model).__name__} (transformers 5) "
                              f"{sorted(present)} are fused with {sorted(set(required) - present)} into the experts' "
                              f"{new!r}; allowed: target all of {list(required)} or none")
        if len(present) == len(required) > 1:  # r LoRAs of rank r fused: rank and alpha double, alpha / r stays
            key = rf".*\.{re.escape(new)}"
            rank_pattern[key] = config.r * len(required)  # type: ignore[attr-defined]
            alpha_pattern[key] = config.lora_alpha * len(required)  # type: ignore[attr-defined]
    _warn_unadapted_linears(model, names, mapping)
    return {"target_modules": remaining, "target_parameters": sorted(parameters), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


def _leaf_names(targets: str, config: PeftConfig, model: nn.Module, mapping: dict[str, str]) -> set[str]:
    """A str ``target_modules`` as the leaf names it selects: ``"all-linear"`` gives the leaf names of its linear
    layers plus every old name; a regex gives the leaf names of the modules and parameters it fully matches, plus
    the old names it would match inside a fused parameter's module (``...experts.gate_proj``)."""
    from ...injection.match import ALL_LINEAR
    from ...injection.plan import all_linear_names

    if targets.lower() == ALL_LINEAR:
        return {name.rsplit(".", 1)[-1] for name in all_linear_names(model, config)} | set(mapping)
    keys = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    found = {key.rsplit(".", 1)[-1] for key in keys if re.fullmatch(targets, key)}
    containers = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
    found |= {old for old in mapping if any(re.fullmatch(targets, f"{c}.{old}") for c in containers)}
    return found


def _warn_unadapted_linears(model: nn.Module, names: set[str], mapping: dict[str, str]) -> None:
    """Warn about the ``nn.Linear`` modules that the targets named but the conversion leaves out (their leaf name is
    an old expert name: dense MLPs, shared experts)."""
    left = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and any((name == t or name.endswith("." + t)) and t.rsplit(".", 1)[-1] in mapping for t in names)]
    if not left:
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in left})
    weights = sorted({".".join(name.split(".")[-2:]) + ".weight" for name in left})
    more = " ..." if len(left) > 4 else ""
    warnings.warn(
        f"on this {type(model).__name__} (transformers 5), the targets {leaves} name the fused experts' parameters, "
        f"as in the reference, so the nn.Linear modules of those names are not adapted: {left[:4]}{more}. To adapt "
        f"them as well, add their weights to target_parameters ({weights}); the reference loads such adapters the "
        "same way", PeftWarning, stacklevel=5)


#: a transformers-4 per-expert LoRA key: ``<experts path>.<e>.<projection>.lora_<A|B>.weight``
_V4_KEY = re.compile(r"^(?P<experts>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.lora_(?P<ab>[AB])\.weight$")
#: the module renames transformers applies to these checkpoints (``block_sparse_moe`` became ``mlp``)
_RENAMES = {"mixtral": ((".block_sparse_moe.", ".mlp."),), "qwen2_moe": ()}


def convert_v4_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor],
                          adapter_name: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with per-expert LoRA tensors written for transformers 4 (``experts.<e>.w1.lora_A.weight``,
    or ``gate_proj/up_proj/down_proj``) fused into the layout of LoRA on the experts' parameters, as the reference
    converts them at load: ``gate_up_proj``'s ``A: (E·2r, h)`` stacks ``[A_gate; A_up]`` per expert and its
    ``B: (2·ff, 2r·E)`` is rank-major with the block-diagonal ``[[B_gate, 0], [0, B_up]]`` per expert (rank and
    alpha double, the scaling is kept); ``down_proj`` stacks likewise. The keys get the nesting of the model's
    adapters (``experts.base_layer.lora_A.weight`` for the inner parameter). Unchanged for other models/keys."""
    pattern = conversion_pattern(model)
    if pattern is None or not any(_V4_KEY.match(k) for k in state_dict):
        return state_dict
    mapping, fused = TARGET_MAPPING[pattern], FUSED[pattern]
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[tuple[str, str, int], torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for old, new in _RENAMES[pattern]:
            key = key.replace(old, new)
        match = _V4_KEY.match(key)
        if match is None or mapping.get(match["proj"]) not in ("gate_up_proj", "down_proj"):
            out[key] = tensor
            continue
        target = mapping[match["proj"]]
        groups.setdefault((match["experts"], target), {})[(match["proj"], match["ab"], int(match["expert"]))] = tensor
    for (experts, target), parts in groups.items():
        sources = fused.get(target, tuple(o for o, n in mapping.items() if n == target))
        A, B = _fuse(parts, sources)
        prefix = experts + "." + "base_layer." * _depth(model, experts, target)
        out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"] = A, B
    return out


def _fuse(parts: dict[tuple[str, str, int], torch.Tensor], sources: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """``(A: (E·k·r, in), B: (k·out_i, k·r·E))`` from per-expert ``A: (r, in)``, ``B: (out_i, r)`` of the ``k``
    ``sources`` projections fused into one parameter (block-diagonal B, rank-major)."""
    experts = 1 + max(e for _, _, e in parts)
    rank = parts[(sources[0], "A", 0)].shape[0]
    outs = [parts[(s, "B", 0)].shape[0] for s in sources]
    A = torch.stack([torch.cat([parts[(s, "A", e)] for s in sources]) for e in range(experts)])  # (E, k·r, in)
    B = A.new_zeros(sum(outs), len(sources) * rank, experts)  # (k·out, k·r, E): column j·E + e after reshape
    row = 0
    for i, (source, size) in enumerate(zip(sources, outs)):
        for e in range(experts):
            B[row:row + size, i * rank:(i + 1) * rank, e] = parts[(source, "B", e)]
        row += size
    return A.reshape(-1, A.shape[-1]), B.reshape(B.shape[0], -1)


def _depth(model: nn.Module, experts: str, parameter: str) -> int:
    """How many ``base_layer.`` the key of ``parameter``'s adapter of the module at checkpoint path ``experts`` has:
    its position in the module's chain of parameter adapters (0 when there is none yet)."""
    path = experts.removeprefix("base_model.model.")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        try:
            module = model.get_submodule("base_model.model." + path)
        except AttributeError:
            return 0
    chain = [layer.parameter_name for layer in module.chain()] if isinstance(module, ParamLayer) else []
    return chain.index(parameter) if parameter in chain else 0
