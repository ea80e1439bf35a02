"""AdaLoRA's importance-based rank allocation (the paper's RankAllocator), over ``{module path: SVDLayer}``.

Per parameter ``p`` of the trained adapter: sensitivity ``I = |p * grad|``, smoothed ``Ī ← β1 Ī + (1-β1) I`` and
uncertainty ``Ū ← β2 Ū + (1-β2) |I - Ī|``; an element scores ``Ī * Ū``. Triplet ``i`` of a layer (row ``i`` of
``A``, ``E[i]``, column ``i`` of ``B``) scores ``s(E[i]) + mean_j s(A[i, j]) + mean_j s(B[j, i])``. The lowest
``init_budget - budget`` triplets over all layers get ``E[i] = 0``; the survivors form the ``rank_pattern``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import AdaLoraConfig
from .layers import SVDLayer

#: the names of the three factors of a triplet
FACTORS = ("lora_A", "lora_E", "lora_B")


def pattern_key(path: str) -> str:
    """The ``rank_pattern`` key of the layer at ``path`` (relative to the user's model): ``<path>.lora_E``."""
    return f"{path}.lora_E"


def budget_schedule(config: AdaLoraConfig, init_budget: int, target_budget: int, step: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at ``step``: ``init_budget`` up to ``tinit``; then
    ``int((init - target) * (1 - (step - tinit) / (total_step - tfinal - tinit))**3 + target)``, masking every
    ``deltaT`` steps; ``target_budget`` (masking) after ``total_step - tfinal``."""
    assert config.total_step is not None
    if step <= config.tinit:
        return init_budget, False
    if step > config.total_step - config.tfinal:
        return target_budget, True
    coeff = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    budget = int((init_budget - target_budget) * (coeff**3) + target_budget)
    return budget, step % config.deltaT == 0


class RankAllocator:
    """Importance statistics and masking for adapter ``adapter_name`` of ``layers`` (``{path: SVDLayer}``)."""

    def __init__(self, config: AdaLoraConfig, layers: Mapping[str, SVDLayer], adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.paths = tuple(sorted(layers))
        self.init_budget = sum(layers[p].r[adapter_name] for p in self.paths)
        self.target_budget = config.target_r * len(self.paths)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance statistics."""
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """See :func:`budget_schedule`."""
        return budget_schedule(self.config, self.init_budget, self.target_budget, step)

    @torch.no_grad()
    def update_ipt(self, layers: Mapping[str, SVDLayer]) -> None:
        """Fold the current ``|p * grad|`` of every factor into the EMAs (a missing gradient counts as 0)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for path in self.paths:
            for attr in FACTORS:
                p = getattr(layers[path], attr)[self.adapter_name]
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                key = (path, attr)
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = beta1 * avg + (1 - beta1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = beta2 * unc + (1 - beta2) * (ipt - avg).abs()

    def _score(self, path: str, attr: str, like: torch.Tensor) -> torch.Tensor:
        key = (path, attr)
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(like)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self, layers: Mapping[str, SVDLayer]) -> dict[str, torch.Tensor]:
        """``{path: (r,) score}`` of every triplet."""
        scores: dict[str, torch.Tensor] = {}
        for path in self.paths:
            layer = layers[path]
            A, E, B = (getattr(layer, attr)[self.adapter_name] for attr in FACTORS)
            a = self._score(path, "lora_A", A).mean(dim=1)
            b = self._score(path, "lora_B", B).mean(dim=0)
            scores[path] = self._score(path, "lora_E", E).view(-1) + (a + b)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, layers: Mapping[str, SVDLayer], budget: int) -> dict[str, list[bool]]:
        """Zero the ``E`` entries of the ``init_budget - budget`` lowest-scoring triplets (ties at the threshold are
        all masked, as in the reference); returns the ``rank_pattern``."""
        scores = self.triplet_scores(layers)
        k = self.init_budget - budget
        threshold = None
        if k > 0 and scores:
            threshold = torch.kthvalue(torch.cat([s.detach().float().cpu() for s in scores.values()]), k)[0].item()
        pattern: dict[str, list[bool]] = {}
        for path, score in scores.items():
            keep = torch.ones_like(score, dtype=torch.bool) if threshold is None else score > threshold
            layers[path].lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[pattern_key(path)] = keep.view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, layers: Mapping[str, SVDLayer], pattern: Mapping[str, list[bool]]) -> None:
        """Zero the ``E`` entries that ``pattern`` drops (layers missing from it are left alone)."""
        for path in self.paths:
            keep = pattern.get(pattern_key(path))
            if keep is None:
                continue
            E = layers[path].lora_E[self.adapter_name]
            if len(keep) != E.shape[0]:
                continue  # already resized to the pattern
            mask = torch.tensor(keep, dtype=torch.bool, device=E.device).view(-1, 1)
            E.masked_fill_(~mask, 0.0)
