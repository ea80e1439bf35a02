"""OFT layers: a block-diagonal orthogonal rotation of the input features of a frozen layer.

For a base weight ``W: (out, in)`` an adapter holds ``r`` blocks ``R_i: (b, b)`` with ``r·b = in`` (see
``rotation.py`` for how they are built from the saved ``oft_R.weight: (r, b(b-1)/2)``) and computes

- Linear: ``y = base(x @ blockdiag(R))``, i.e. the merged weight ``W' = W @ blockdiag(R)ᵀ``;
- convolutions: ``W' = W_flat @ blockdiag(R)ᵀ`` on the flattened filter ``W_flat: (out, in/groups · prod(kernel))``,
  and the output is the base convolution with ``W'`` (exactly the reference's merged layer; its unmerged forward
  unfolds and re-folds the input, which sums overlapping patches for kernels larger than 1, see README);
- Embedding: ``y = base(ids) @ blockdiag(R)`` (the embedding dimension is rotated, ``oft_embedding_R``).

Several active adapters apply in order: ``x @ R_1 @ R_2 ...``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import PeftWarning
from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import CONV, EMBEDDING
from ...layers.transform_merge import check_transforms, merge_transforms, unmerge_transforms
from .rotation import block_dropout, block_rotate, cayley, project_coft


@dataclass(frozen=True)
class OFTSettings:
    """Per-adapter hyper-parameters of one layer (after the block size was fitted to the layer)."""

    r: int
    block_size: int
    module_dropout: float
    coft: bool
    eps: float
    block_share: bool
    use_cayley_neumann: bool
    num_cayley_neumann_terms: int


class OFTRotation(nn.Module):
    """Holder of one adapter's packed skew-symmetric parameters, saved as ``oft_R.weight`` (reference name).

    ``weight: (r, b(b-1)/2)`` (``(1, ...)`` with ``block_share``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class OFTLayer(AdapterLayer):
    """OFT on ``nn.Linear`` (also quantized: bitsandbytes, torchao), ``nn.Embedding`` and ``nn.Conv1d/2d/3d``.

    The forward only rotates the input of the base layer, so a quantized linear runs its own kernel; merging
    dequantizes, rotates and re-quantizes its weight (``peftkit.quantization``)."""

    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size", "oft_settings")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer)
        self.kind = kind
        self.oft_R = nn.ModuleDict({})
        self.oft_embedding_R = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.oft_settings: dict[str, OFTSettings] = {}
        base = self.get_base_layer()
        if kind == EMBEDDING:
            self.in_features, self.out_features = base.embedding_dim, base.num_embeddings
        elif kind == CONV:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    # ------------------------------------------------------------------ creation
    def _holder(self) -> nn.ModuleDict:
        return self.oft_embedding_R if self.kind == EMBEDDING else self.oft_R

    def update_layer(self, adapter_name: str, settings: OFTSettings, init_weights: bool,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``weight: (r or 1, b(b-1)/2)``, zeros (``R = I``) or ~ N(0, 0.1²)."""
        weight = self.get_base_layer().weight
        rows = 1 if settings.block_share else settings.r
        n_elements = settings.block_size * (settings.block_size - 1) // 2
        dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)  # bnb: int8 / uint8
        deferred = skip_random_init()
        if deferred:  # a load fills it: never allocate (or initialise) what the checkpoint overwrites
            module = OFTRotation(torch.empty(rows, n_elements, device="meta", dtype=dtype))
        elif init_weights:
            module = OFTRotation(torch.zeros(rows, n_elements, dtype=dtype, device=weight.device))
        else:
            module = OFTRotation(torch.empty(rows, n_elements).normal_(0.0, 0.1).to(weight.device, dtype))
        self._holder()[adapter_name] = module
        self.r[adapter_name] = settings.r
        self.oft_block_size[adapter_name] = settings.block_size
        self.oft_settings[adapter_name] = settings
        if deferred:
            defer_init([module.weight], weight.device)
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ rotations
    def rotation_blocks(self, name: str, dtype: torch.dtype | None = None, dropout: bool = False) -> torch.Tensor:
        """The blocks ``R: (r or 1, b, b)`` of adapter ``name`` (COFT projects the stored parameter first, in place,
        as the reference does on every use; ``dropout``: the multiplicative block dropout of training)."""
        s = self.oft_settings[name]
        param = self._holder()[name].weight
        if s.coft:
            with torch.no_grad():
                param.copy_(project_coft(param, s.block_size, s.eps))
        vec = param if dtype is None else param.to(dtype)
        blocks = cayley(vec, s.block_size, s.use_cayley_neumann, s.num_cayley_neumann_terms)
        if dropout and s.module_dropout > 0:
            blocks = block_dropout(blocks, s.module_dropout)
        return blocks

    def _compute_dtype(self, name: str) -> torch.dtype:
        """fp32 for half-precision parameters on CPU (slow half matmuls there), else the parameter's dtype."""
        param = self._holder()[name].weight
        if param.device.type == "cpu" and param.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return param.dtype

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The rotation of adapter ``adapter_name`` as the dense block-diagonal matrix ``(F, F)`` (``F = in``, or
        the flattened filter size of a convolution), as the reference's ``get_delta_weight`` returns: OFT merges
        multiplicatively (``W' = W @ Rᵀ``; embeddings ``E' = E @ R``), not by adding a delta."""
        blocks = self.rotation_blocks(adapter_name, self._compute_dtype(adapter_name)).detach()
        n = self._features() // blocks.shape[-1]
        dtype = self._holder()[adapter_name].weight.dtype
        return torch.block_diag(*blocks.expand(n, -1, -1)).to(dtype)

    def _features(self) -> int:
        """Length of the rotated vectors: ``in``, ``embedding_dim`` or ``in/groups · prod(kernel)``."""
        if self.kind == CONV:
            return conv_filter_size(self.get_base_layer())
        return self.in_features

    # ------------------------------------------------------------------ merging (multiplicative)
    def _rotate_weight(self, weight: torch.Tensor, name: str, inverse: bool = False) -> torch.Tensor:
        """The base weight after merging (or, ``inverse``, unmerging) adapter ``name``; the weight's shape."""
        blocks = self.rotation_blocks(name, self._compute_dtype(name)).detach()
        if inverse:
            blocks = torch.linalg.inv(blocks.float()).to(blocks.dtype)  # Neumann blocks are not exactly orthogonal
        flat = weight.reshape(weight.shape[0], -1).to(blocks.dtype)
        # rows of W (out, F) rotate by Rᵀ (W @ blockdiag(R)ᵀ); embeddings E (num, dim) by R
        rotated = block_rotate(flat, blocks if self.kind == EMBEDDING else blocks.transpose(1, 2))
        return rotated.reshape(weight.shape).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Rotate the base weight by each adapter (in order); ``safe_merge`` checks for NaN/inf before writing.
        A quantized base is dequantized, rotated and re-quantized (the error is measured and reported)."""
        # forward computes x R_1 R_2 ... Wᵀ, so W' = W ... R_2ᵀ R_1ᵀ: the last adapter is merged first
        merge_transforms(self, reversed(self._adapters_to_merge(adapter_names)),
                         lambda name, w: self._rotate_weight(w, name), safe_merge)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would put NaN/inf into the base weight."""
        check_transforms(self, reversed(self._adapters_to_merge(adapter_names, warn=False)),
                         lambda name, w: self._rotate_weight(w, name), chain=True)

    def unmerge(self) -> None:
        """Undo the merged adapters, last merged first, with the inverse of each block (exact up to rounding)."""
        unmerge_transforms(self, lambda name, w: self._rotate_weight(w, name, inverse=True))

    # ------------------------------------------------------------------ forward
    def _rotate(self, x: torch.Tensor, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """``x: (..., F)`` rotated by the adapters ``names`` in order, in the first adapter's dtype."""
        for name in names:
            param = self._holder()[name].weight
            x = block_rotate(x.to(param.dtype), self.rotation_blocks(name, dropout=self.training))
        return x

    def _conv_weight(self, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """The convolution weight ``W @ (R_1 R_2 ...)ᵀ`` of the adapters ``names`` (base weight's shape)."""
        base = self.get_base_layer()
        weight = base.weight
        flat = weight.reshape(weight.shape[0], -1)
        for name in reversed(tuple(names)):  # x R1 R2 Wᵀ = x (W R2ᵀ R1ᵀ)ᵀ
            param = self._holder()[name].weight
            flat = block_rotate(flat.to(param.dtype), self.rotation_blocks(name, dropout=self.training).transpose(1, 2))
        return flat.reshape(weight.shape).to(weight.dtype)

    def _forward_names(self, x: torch.Tensor, names: tuple[str, ...] | list[str], *args: Any,
                       **kwargs: Any) -> torch.Tensor:
        """The output with adapters ``names`` applied, for any layer kind (``x`` as the base layer takes it)."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self.kind == EMBEDDING:
            result = self.base_layer(x, *args, **kwargs)
            return self._rotate(result, names).to(result.dtype)
        if self.kind == CONV:
            if isinstance(self.base_layer, AdapterLayer):  # nested (mixed model): 1x1 kernels only, see factory
                moved = self._rotate(x.movedim(1, -1), names).movedim(-1, 1)
                return self.base_layer(moved.to(x.dtype), *args, **kwargs)
            base = self.get_base_layer()
            return base._conv_forward(x, self._conv_weight(names).to(x.dtype), base.bias)
        return self.base_layer(self._rotate(x, names).to(x.dtype), *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear ``(..., in) -> (..., out)``; conv ``(N, C_in, *) -> (N, C_out, *)``; embedding ``ids -> (..., dim)``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_replace(x, self.base_layer(x, *args, **kwargs),
                                      lambda name, xs: self._forward_names(xs, [name], *args, **kwargs))
        return self._forward_names(x, self._forward_adapters, *args, **kwargs)


def fit_block_size(features: int, r: int, block_size: int) -> tuple[int, int, str | None]:
    """``(r, block_size, warning or None)`` with ``r · block_size == features``: the reference's rule — the given
    one of ``r`` / ``oft_block_size`` (the other is 0) moves to the nearest divisor of ``features`` (the lower one on
    a tie; ``features`` when larger)."""
    if r == 0:
        if features % block_size != 0 or block_size > features:
            fitted = _nearest_divisor(features, block_size)
            return features // fitted, fitted, (f"Invalid `oft_block_size` ({block_size})! Adjusted "
                                                f"`oft_block_size` to ({fitted}).")
        return features // block_size, block_size, None
    if features % r != 0 or r > features:
        fitted = _nearest_divisor(features, r)
        return fitted, features // fitted, f"Invalid `r` ({r})! Adjusted `r` to ({fitted})."
    return r, features // r, None


def _nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest to ``value`` (the lower one on a tie); ``n`` when ``value >= n``."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def conv_filter_size(module: nn.Module) -> int:
    """``in_channels / groups · prod(kernel_size)`` of a convolution (the length OFT rotates)."""
    return (module.in_channels // module.groups) * math.prod(module.kernel_size)


def warn_fitted(message: str | None) -> None:
    """Emit the reference's warning about an adjusted ``r`` / ``oft_block_size``."""
    if message is not None:
        warnings.warn(message, PeftWarning, stacklevel=4)
