"""``ShiraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig, as_set, check, is_int
from ...errors import PeftWarning
from ...types import PeftType

#: ``mask_fn(base_layer, r, **kwargs) -> (out, in)`` mask of 0/1 holding exactly ``r * (in + out)`` ones
MaskFn = Callable[..., torch.Tensor]


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs: Any) -> torch.Tensor:
    """The reference's default mask: ``(out, in)`` bool, True at the first ``r * (in + out)`` entries of a
    ``torch.randperm(out * in)`` drawn from a fresh CPU generator seeded with ``random_seed`` (None: the generator's
    default seed, so every layer of every run draws the same permutation), on the base weight's device."""
    from .layers import linear_shape, mask_positions

    out_features, in_features = linear_shape(base_layer)
    flat = mask_positions(out_features, in_features, r, random_seed)
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[flat] = True
    return mask.view(out_features, in_features).to(base_layer.weight.device)


@dataclass
class ShiraConfig(PeftConfig):
    """Configuration of a SHiRA adapter (field names and defaults of the reference's ``ShiraConfig``).

    SHiRA (Sparse High Rank Adapters, https://huggingface.co/papers/2406.13175) trains ``r * (in + out)`` entries of
    each targeted ``W: (out, in)`` (as many parameters as a rank-``r`` LoRA, but a sparse, high-rank update):
    ``shira_weight: (k,)`` at the fixed positions ``shira_indices: (2, k)`` (rows, columns; int32, saved), so
    ``ΔW = scatter(shira_weight)`` at those positions (times the layer's ``scaling``, 1.0). ``mask_type="random"``
    picks the positions with :func:`random_mask` (seeded by ``random_seed``); any other ``mask_type`` needs a mask
    function set as ``config.mask_fn = fn`` after construction (a runtime attribute: never saved; a load takes the
    positions from the file). ``init_weights=True`` zeroes ``shira_weight`` (identity); ``False`` draws ``N(0, 1)``.
    Only ``nn.Linear`` layers are supported (``fan_in_fan_out`` exists for the format and is not used).
    """

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SHIRA
        self.target_modules = as_set(self.target_modules)
        check(is_int(self.r) and self.r >= 1, "r", self.r,
              "allowed: an int >= 1 (with r * (in + out) <= in * out for every targeted layer)")
        check(isinstance(self.mask_type, str), "mask_type", self.mask_type,
              "allowed: 'random', or any name together with config.mask_fn = <your mask function>")
        check(self.random_seed is None or is_int(self.random_seed), "random_seed", self.random_seed,
              "allowed: None or an int")
        for name in ("fan_in_fan_out", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        self.mask_fn: MaskFn | None = random_mask if self.mask_type == "random" else None
        if self.mask_fn is None and not self.inference_mode:
            warnings.warn(f"mask_type={self.mask_type!r} is not 'random': set config.mask_fn = <your mask function> "
                          "before creating the adapter", PeftWarning, stacklevel=3)

    def copy(self, **changes: Any) -> ShiraConfig:
        """A new config with ``changes`` applied; a custom ``mask_fn`` carries over unless ``mask_type`` changes."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PeftWarning)  # the custom-mask warning was given for the original
            new = super().copy(**changes)
        if "mask_type" not in changes:
            new.mask_fn = self.mask_fn
        return new
