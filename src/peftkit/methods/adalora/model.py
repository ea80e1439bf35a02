"""What AdaLoRA adds to the generic tuner: ``update_and_allocate``, the orthogonality regulariser, and the
``rank_pattern`` slicing on save / resizing on load (registered as ``MethodSpec`` hooks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError
from .allocator import FACTORS, RankAllocator, pattern_key
from .config import AdaLoraConfig
from .layers import SVDLayer

#: the dimension of each factor that indexes the rank (rows of A and E, columns of B)
_RANK_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}


def _user_model_prefix(model: nn.Module) -> str:
    """The path of the user's model inside ``model`` (``"base_model.model."`` for a PeftModel, ``"model."`` for a
    tuner, ``""`` for a model with injected adapters): the deepest module holding a ``peft_config`` attribute."""
    deepest = ""
    for path, module in model.named_modules():
        if "peft_config" in vars(module) and len(path) >= len(deepest):
            deepest = path
    return f"{deepest}." if deepest else ""


def svd_layers(model: nn.Module, adapter_name: str) -> dict[str, SVDLayer]:
    """``{path relative to the user's model: layer}`` of the AdaLoRA layers of ``model`` holding ``adapter_name``."""
    prefix = _user_model_prefix(model)
    return {path.removeprefix(prefix): m for path, m in model.named_modules()
            if isinstance(m, SVDLayer) and adapter_name in m.lora_E}


def normalize_rank_pattern(pattern: Mapping[str, Any] | None, adapter_name: str) -> dict[str, list[bool]]:
    """``pattern`` with keys ``<path>.lora_E`` (the reference keeps ``.<adapter>`` in memory) and bool lists."""
    out: dict[str, list[bool]] = {}
    for key, value in (pattern or {}).items():
        key = key.removeprefix("base_model.model.").removesuffix(f".{adapter_name}")
        out[key] = [bool(v) for v in (value.view(-1).tolist() if isinstance(value, torch.Tensor) else value)]
    return out


# ------------------------------------------------------------------------------ save / load hooks
def export_state(model: nn.Module, config: PeftConfig, adapter_name: str,
                 tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``MethodSpec.export_state``: slice the saved ``lora_A`` / ``lora_E`` rows and ``lora_B`` columns of every
    layer by ``config.rank_pattern`` (so a tensor can be ``(0, in)``), as the reference saves them. Keys of
    ``tensors`` are relative to ``model``; tensors already at the pattern's rank are kept."""
    pattern = normalize_rank_pattern(getattr(config, "rank_pattern", None), adapter_name)
    if not pattern:
        return tensors
    prefix = _user_model_prefix(model)
    out = dict(tensors)
    for path in svd_layers(model, adapter_name):
        keep = pattern.get(pattern_key(path))
        if keep is None or all(keep):
            continue
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
        for attr in FACTORS:
            key = f"{prefix}{path}.{attr}"
            tensor, dim = out.get(key), _RANK_DIM[attr]
            if tensor is not None and tensor.shape[dim] == len(keep):
                out[key] = tensor.index_select(dim, index.to(tensor.device))
    return out


def prepare_load(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """``MethodSpec.prepare_load``: resize the layers of ``adapter_name`` to ``config.rank_pattern`` (layers still
    at the pattern's full length) so that a checkpoint saved with that pattern loads; ``ranknum`` is kept."""
    pattern = normalize_rank_pattern(getattr(config, "rank_pattern", None), adapter_name)
    if not pattern:
        return
    for path, layer in svd_layers(model, adapter_name).items():
        keep = pattern.get(pattern_key(path))
        if keep is not None and layer.r[adapter_name] == len(keep) and not all(keep):
            layer.resize(adapter_name, torch.tensor(keep, dtype=torch.bool))


# ------------------------------------------------------------------------------ tuner
def _trained_adapter(tuner: Any) -> str | None:
    """The active adapter being trained (None when no active adapter is trainable). AdaLoRA trains one adapter at
    a time: several raise :class:`ConfigError`."""
    names = [a for a in tuner.active_adapters if tuner._trainable.get(a)]
    if len(names) > 1:
        raise ConfigError("inference_mode", False, f"AdaLoRA trains one adapter at a time, but {names} are active "
                          "and trainable; activate one of them or freeze the others with "
                          "set_adapter(name, inference_mode=True)")
    return names[0] if names else None


def orthogonal_regularization(tuner: Any) -> torch.Tensor | None:
    """``MethodSpec.loss_term``: ``orth_reg_weight * mean_P ||P Pᵀ - I||_F`` over the trained adapter's factors
    (``A Aᵀ`` for ``A: (r, in)``, ``Bᵀ B`` for ``B: (out, r)``); None without a trained adapter or with weight 0.
    (Several active trainable adapters, which only ``update_and_allocate`` refuses, each add their own term.)"""
    total: torch.Tensor | None = None
    for name in [a for a in tuner.active_adapters if tuner._trainable.get(a)]:
        weight = tuner.peft_config[name].orth_reg_weight
        norms = []
        for layer in svd_layers(tuner.model, name).values():
            A, B = layer.lora_A[name], layer.lora_B[name]
            for cov in (A @ A.T, B.T @ B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                norms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        if weight != 0 and norms:
            term = weight * torch.stack(norms).mean()
            total = term if total is None else total + term
    return total


class AdaLoraTunerMixin:
    """Methods of ``AdaLoraModel`` beyond the generic tuner (mixed into it by ``MethodSpec.tuner_mixin``)."""

    model: nn.Module
    peft_config: dict[str, PeftConfig]

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance statistics and the rank budget of the trained adapter after optimizer step
        ``global_step`` (1-based: the number of optimizer steps done). Call it after ``optimizer.step()`` and
        before ``optimizer.zero_grad()`` -- or let :func:`peftkit.attach_adalora` / ``AdaLoraCallback`` do it.

        Before ``total_step - tfinal`` the budget follows the cubic schedule; at that step the final allocation is
        made and stored in ``peft_config[name].rank_pattern``; afterwards the pattern keeps masking ``E``.
        """
        name = _trained_adapter(self)
        if name is None:
            raise ConfigError("inference_mode", True, "update_and_allocate needs an active trainable AdaLoRA "
                              "adapter; load it with is_trainable=True or call set_adapter(name, inference_mode=False)")
        config = self.peft_config[name]
        assert isinstance(config, AdaLoraConfig) and config.total_step is not None
        layers = svd_layers(self.model, name)
        allocator = self._rank_allocator(name, config, layers)
        final = config.total_step - config.tfinal
        if global_step < final:
            allocator.update_ipt(layers)
            budget, mask = allocator.budget_schedule(global_step)
            if mask:
                config.rank_pattern = allocator.mask_to_budget(layers, budget)
        elif global_step == final or config.rank_pattern is None:
            if config.rank_pattern is None and global_step > final:
                allocator.update_ipt(layers)  # first call after the budgeting phase: score what we have
            budget, _ = allocator.budget_schedule(final)
            config.rank_pattern = allocator.mask_to_budget(layers, budget)
            allocator.reset_ipt()
        else:
            allocator.mask_using_rank_pattern(layers, normalize_rank_pattern(config.rank_pattern, name))

    def _rank_allocator(self, name: str, config: AdaLoraConfig, layers: dict[str, SVDLayer]) -> RankAllocator:
        allocator = vars(self).get("rankallocator")
        if allocator is None or allocator.adapter_name != name or allocator.paths != tuple(sorted(layers)):
            allocator = RankAllocator(config, layers, name)
            vars(self)["rankallocator"] = allocator
        allocator.config = config
        return allocator

    def resize_modules_by_rank_pattern(self, rank_pattern: Mapping[str, Any], adapter_name: str) -> None:
        """Shrink the layers of ``adapter_name`` to ``rank_pattern`` (the reference's method of this name)."""
        prepare_load(self.model, self.peft_config[adapter_name].copy(rank_pattern=dict(rank_pattern)), adapter_name)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported for AdaLoRA (as in the reference): raises ``TypeError``; use LoRA adapters instead."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter; combine LoRA adapters instead")
