"""The frozen random bases RandLoRA shares across the layers of a model, drawn exactly as the reference draws them.

Shapes: ``randlora_A: (r, 1, min_dim)`` and ``randlora_B: (max_dim, NB, r)`` with ``NB = ceil(min_dim / r)``, where
``(max_dim, min_dim)`` are the max / min of the largest adapted layer's ``(out, in)`` (elementwise maximum over the
adapter's layers, the reference's ``_find_dim``). One CPU generator seeded with ``projection_prng_key`` draws ``A``
then ``B``; both are divided by their standard deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BasisSpec:
    """What determines a pair of bases: two adapters with equal specs share one :class:`RandLoraBases` object."""

    seed: int
    r: int
    max_dim: int
    min_dim: int
    sparsity: float | None  # None: dense kaiming-uniform; else ternary with P(±1) = 1 / (2 * sparsity) each

    @property
    def num_bases(self) -> int:
        """``NB = ceil(min_dim / r)``: enough rank-``r`` bases for a full-rank update of the largest layer."""
        return math.ceil(self.min_dim / self.r)


def _draw_dtype() -> torch.dtype:
    """The reference draws dense bases in bfloat16 where ``accelerate`` reports bf16 support (always on CPU-only
    hosts; on CUDA hosts the device's support), else float16: the same dtype gives the same bits."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``kaiming_uniform_(a=sqrt(5))`` of a new half-precision tensor (the reference's ``_kaiming_init``)."""
    with torch.no_grad():
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=_draw_dtype()), a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``-1`` below ``1 / (2 sparsity)``, ``+1`` above ``1 - 1 / (2 sparsity)``, else ``0`` (float32)."""
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def generate_bases(spec: BasisSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(randlora_A: (r, 1, min_dim), randlora_B: (max_dim, NB, r))`` on CPU, bit-exact with the reference
    (dense: half precision as drawn; sparse: float32), each divided by its own standard deviation."""
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    nb = spec.num_bases
    if spec.sparsity is None:
        a = _kaiming((spec.r, 1, spec.min_dim), generator)
        b = torch.cat([_kaiming((spec.max_dim, 1, spec.r), generator) for _ in range(nb)], dim=1)
    else:
        a = _ternary(torch.rand((spec.r, 1, spec.min_dim), generator=generator), spec.sparsity)
        b = _ternary(torch.rand((spec.max_dim, nb, spec.r), generator=generator), spec.sparsity)
    return a / a.std(), b / b.std()


class RandLoraBases(nn.Module):
    """One pair of frozen bases, referenced by every RandLoRA layer of the adapters that use it (non-persistent
    buffers: checkpoints get them from the method's ``export_state`` under the reference's keys, not from
    ``state_dict``).

    Attributes:
        randlora_A: ``(r, 1, min_dim)``; randlora_B: ``(max_dim, NB, r)``; spec: how they were drawn;
        save_projection: whether checkpoints store them.
    """

    def __init__(self, spec: BasisSpec, save_projection: bool, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        a, b = generate_bases(spec)
        self.register_buffer("randlora_A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("randlora_B", b.to(device=device, dtype=dtype), persistent=False)
        self.spec, self.save_projection = spec, save_projection

    @classmethod
    def from_tensors(cls, spec: BasisSpec, save_projection: bool, randlora_A: torch.Tensor,
                     randlora_B: torch.Tensor) -> RandLoraBases:
        """Bases holding the given tensors (a checkpoint's) instead of drawing them."""
        bases = cls.__new__(cls)
        nn.Module.__init__(bases)
        bases.register_buffer("randlora_A", randlora_A.detach().clone(), persistent=False)
        bases.register_buffer("randlora_B", randlora_B.detach().clone(), persistent=False)
        bases.spec, bases.save_projection = spec, save_projection
        return bases

    def extra_repr(self) -> str:
        return f"A={tuple(self.randlora_A.shape)}, B={tuple(self.randlora_B.shape)}, seed={self.spec.seed}"
