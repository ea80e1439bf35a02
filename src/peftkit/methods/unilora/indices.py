"""Uni-LoRA's fixed index assignment: which entry of ``theta_d`` (and which scale) each LoRA factor entry uses.

Pure functions of shapes and a seed; the reference's draw (numpy's ``default_rng(proj_seed)``) so that adapters
saved without their indices (``save_indices=False``) regenerate them bit-exactly in either library.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError


def balanced_indices(count: int, theta_d_length: int, seed: int) -> torch.Tensor:
    """``(count,)`` int64 entries of ``[0, theta_d_length)``, each value used ``floor`` or ``ceil`` of ``count /
    theta_d_length`` times, shuffled: ``count // d`` copies of every value, plus ``count % d`` distinct values drawn
    without replacement, then shuffled, all from ``numpy.random.default_rng(seed)`` (the reference's draw)."""
    import numpy as np  # a dependency of transformers; imported here so that ``import peftkit`` stays cheap

    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(theta_d_length), count // theta_d_length)
    remaining = count % theta_d_length
    if remaining > 0:
        data = np.concatenate([data, rng.choice(theta_d_length, size=remaining, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def inverse_sqrt_counts(indices: torch.Tensor, theta_d_length: int) -> torch.Tensor:
    """``(theta_d_length,)`` float32: ``1 / sqrt(how often each entry occurs in indices)``, 0 for unused entries."""
    counts = torch.bincount(indices, minlength=theta_d_length)
    out = torch.zeros(theta_d_length, dtype=torch.float32)
    used = counts > 0
    out[used] = counts[used].float().rsqrt()
    return out


def assign_indices(shapes: list[tuple[tuple[int, int], tuple[int, int]]], theta_d_length: int, seed: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ``(indices_A, indices_B, scales_A, scales_B)`` for the layers whose factor shapes are ``shapes``
    (``[((r, in), (out, r)), ...]`` in model order): one balanced draw over all their entries, consumed in order,
    ``A`` then ``B`` of each layer; the scales (float32, the indices' shapes) are the entries' inverse square-root
    use counts."""
    total = sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes)
    flat = balanced_indices(total, theta_d_length, seed)
    inv = inverse_sqrt_counts(flat, theta_d_length)
    out = []
    start = 0
    for shape_A, shape_B in shapes:
        pair = []
        for shape in (shape_A, shape_B):
            numel = shape[0] * shape[1]
            pair.append(flat[start:start + numel].view(shape).clone())
            start += numel
        out.append((pair[0], pair[1], inv[pair[0]], inv[pair[1]]))
    return out


class UniLoraTunerMixin:
    """Mixed into ``UniLoraModel``: the reference's ``generate_index`` static method."""

    @staticmethod
    def generate_index(lora_param_count: int, theta_d_length: int, proj_seed: int) -> torch.Tensor:
        """The reference's name for :func:`balanced_indices` (``(lora_param_count,)`` int64 indices)."""
        if lora_param_count < 0:
            raise ConfigError("lora_param_count", lora_param_count, "allowed: an int >= 0")
        if theta_d_length <= 0:
            raise ConfigError("theta_d_length", theta_d_length, "allowed: a positive int")
        return balanced_indices(lora_param_count, theta_d_length, proj_seed)
