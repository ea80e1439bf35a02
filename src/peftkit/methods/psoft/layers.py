"""PSOFT layers: an ``r × r`` transform ``R`` trained between frozen SVD factors of a linear weight.

Shapes: base ``W: (out, in)``; frozen ``A: (r, in)`` and ``B: (out, r)`` (rebuilt from ``W`` when an adapter is
created, never saved); trained ``psoft_R.weight``: ``(r(r−1)/2,)`` (``psoft_orth``: the entries above the diagonal of
a skew-symmetric ``Q``) or ``(r, r)``, and ``psoft_R.vector_b`` / ``psoft_R.vector_a``: ``(r,)``.

Forward: ``y = base(x) + scaling · ((dropout(x) Aᵀ)(R − I)ᵀ) Bᵀ`` — three skinny matmuls; no ``(out, in)`` matrix is
built. Merging adds ``ΔW = scaling · B (R − I) A``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, PeftWarning
from ...injection.apply import is_probing
from ...layers.base import AdapterLayer
from ...layers.dispatch import LINEAR, inplace_safe, require_kind
from ...ops.lowrank import can_update_inplace
from .buffers import FrozenBuffers
from .config import PsoftConfig


# ---------------------------------------------------------------------------------------------- R = f(parameters)
def cayley(Q: torch.Tensor) -> torch.Tensor:
    """``(I + Q)(I − Q)⁻¹`` for a skew-symmetric ``Q: (r, r)`` (orthogonal), solved in float32 for half dtypes."""
    eye = torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype)
    half = Q.dtype in (torch.float16, torch.bfloat16)
    Qf, If = (Q.float(), eye.float()) if half else (Q, eye)
    R = torch.linalg.solve(If - Qf, If + Qf, left=False)
    return R.to(Q.dtype) if half else R


def cayley_neumann(Q: torch.Tensor, terms: int, eps: float | None) -> torch.Tensor:
    """The reference's truncated series for the Cayley transform: ``I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)`` for
    ``t = terms >= 3`` (``I`` for ``t = 1``, ``I + 2Q`` for ``t = 2``). With ``eps``, ``Q`` is first rescaled to
    Frobenius norm ``eps`` when it is larger (no data-dependent branch: ``torch.where``)."""
    if eps is not None:
        norm = torch.linalg.norm(Q, ord="fro")
        shrink = torch.isfinite(norm) & (norm > eps)
        Q = Q * torch.where(shrink, eps / (norm + 1e-12), torch.ones_like(norm))
    R = torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype)
    if terms <= 1:
        return R
    R = R + 2.0 * Q
    if terms == 2:
        return R
    power = Q @ Q
    R = R + 2.0 * power
    for _ in range(3, terms - 1):
        power = power @ Q
        R = R + 2.0 * power
    return R + power @ Q


class OrthTransform(nn.Module):
    """The trained ``r × r`` transform of one adapter (the reference's ``OrthLayer``; same parameter names).

    ``weight``: ``(r(r−1)/2,)`` upper-triangle entries of ``Q`` when ``orth``, else the matrix ``(r, r)`` itself;
    ``vector_b`` / ``vector_a``: ``(r,)`` scales of ``R``'s rows / columns (None when disabled).
    """

    def __init__(self, size: int, config: PsoftConfig, dtype: torch.dtype | None, device: torch.device) -> None:
        super().__init__()
        self.size, self.orth = size, config.psoft_orth
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_cayley_neumann_terms = int(config.num_cayley_neumann_terms)
        self.cayley_neumann_eps = config.cayley_neumann_eps
        shape = ((size * (size - 1)) // 2,) if self.orth else (size, size)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.vector_b = nn.Parameter(torch.empty(size, dtype=dtype, device=device)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.empty(size, dtype=dtype, device=device)) if config.psoft_mag_a else None
        if self.orth:
            rows, cols = torch.triu_indices(size, size, 1, device=device)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)

    def reset_parameters(self, init_weights: bool) -> None:
        """Identity ``R`` with unit scale vectors (``init_weights``). ``init_weights=False`` (a test knob) draws
        ``Q ~ N(0, 1)`` (free ``R = I + N(0, 1)``) and scale vectors ``1 + N(0, 1)``: larger than the reference's
        ``N(0, 0.1²)`` with unit vectors, whose update on a tiny random model is below float noise."""
        with torch.no_grad():
            if self.orth:
                self.weight.zero_()
            else:
                nn.init.eye_(self.weight)
            if not init_weights:
                self.weight.add_(torch.randn_like(self.weight))
            for vector in (self.vector_b, self.vector_a):
                if vector is not None:
                    vector.fill_(1.0)
                    if not init_weights:
                        vector.add_(torch.randn_like(vector))

    def skew(self) -> torch.Tensor:
        """``Q = U − Uᵀ: (r, r)`` with ``U`` strictly upper triangular, filled from ``weight``."""
        Q = self.weight.new_zeros(self.size, self.size).index_put((self.rows, self.cols), self.weight)
        return Q - Q.t()

    def matrix(self) -> torch.Tensor:
        """``R: (r, r)`` = ``diag(vector_b) · f(weight) · diag(vector_a)``."""
        if not self.orth:
            R = self.weight
        elif self.use_cayley_neumann:
            R = cayley_neumann(self.skew(), self.num_cayley_neumann_terms, self.cayley_neumann_eps)
        else:
            R = cayley(self.skew())
        if self.vector_b is not None:
            R = self.vector_b[:, None] * R
        if self.vector_a is not None:
            R = R * self.vector_a[None, :]
        return R

    def minus_identity(self) -> torch.Tensor:
        """``R − I: (r, r)``, the part of ``R`` that changes the layer (zero at init)."""
        R = self.matrix()
        return R - torch.eye(self.size, device=R.device, dtype=R.dtype)

    def extra_repr(self) -> str:
        return (f"size={self.size}, orth={self.orth}, use_cayley_neumann={self.use_cayley_neumann}, "
                f"num_cayley_neumann_terms={self.num_cayley_neumann_terms}, "
                f"cayley_neumann_eps={self.cayley_neumann_eps}, mag_a={self.vector_a is not None}, "
                f"mag_b={self.vector_b is not None}")


# ---------------------------------------------------------------------------------------------- frozen factors
def svd_factors(W: torch.Tensor, r: int, mode: str, niter: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` SVD of ``W: (out, in)`` (float32): ``U: (out, r)``, ``S: (r,)``, ``Vh: (r, in)``.

    ``"lowrank"`` runs ``torch.svd_lowrank`` under a forked RNG seeded with ``seed`` (the caller's RNG is left
    alone), so a rebuilt adapter gets the same factors."""
    if mode == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r, :]
    fork = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return U[:, :r], S[:r], V[:, :r].t()


def ab_factors(W: torch.Tensor, r: int, scaling: float, config: PsoftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen ``A: (r, in)``, ``B: (out, r)`` with ``scaling · B A`` = the rank-``r`` SVD truncation of ``W``."""
    U, S, Vh = svd_factors(W, r, config.psoft_svd, config.psoft_svd_lowrank_niter, config.random_seed)
    S = S / scaling
    if config.ab_svd_init == "psoft_init":  # orthonormal rows of A: R acts on an orthonormal basis
        A, B = Vh, U * S[None, :]
    else:  # "pissa_init": symmetric split
        root = S.sqrt()
        A, B = root[:, None] * Vh, U * root[None, :]
    return A.contiguous(), B.contiguous()


# ---------------------------------------------------------------------------------------------- the layer
class PsoftLayer(AdapterLayer):
    """PSOFT on ``nn.Linear`` (reference attribute names: ``psoft_R``, ``_psoft_A_cache``, ``_psoft_B_cache``)."""

    adapter_layer_names = ("psoft_R",)
    other_param_names = ("r", "psoft_alpha", "scaling", "psoft_dropout", "_psoft_A_cache", "_psoft_B_cache")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.psoft_R = nn.ModuleDict()
        self.psoft_dropout = nn.ModuleDict()
        self._psoft_A_cache = FrozenBuffers()
        self._psoft_B_cache = FrozenBuffers()
        self.r: dict[str, int] = {}
        self.psoft_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        self._inplace = inplace_safe(base)

    def update_layer(self, adapter_name: str, r: int, config: PsoftConfig, dtype: torch.dtype | None) -> None:
        """Create adapter ``adapter_name``: ``R`` (identity unless ``init_weights=False``) and the frozen ``A``, ``B``
        from the SVD of the base weight (float32, as the reference; on meta while a load probes shapes)."""
        weight = self.get_base_layer().weight
        scaling = config.psoft_alpha / r
        self.r[adapter_name], self.psoft_alpha[adapter_name] = r, config.psoft_alpha
        self.scaling[adapter_name] = scaling
        self.psoft_dropout[adapter_name] = (nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0
                                            else nn.Identity())
        transform = OrthTransform(r, config, dtype, weight.device)
        transform.reset_parameters(config.init_weights)
        self.psoft_R[adapter_name] = transform
        if is_probing() or weight.is_meta:
            A = torch.empty(r, self.in_features, device="meta")
            B = torch.empty(self.out_features, r, device="meta")
        else:
            with torch.no_grad():
                A, B = ab_factors(weight.detach().to(torch.float32), r, scaling, config)
        self._psoft_A_cache[adapter_name], self._psoft_B_cache[adapter_name] = A, B
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ math
    def hidden(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``(dropout(x) Aᵀ)(R − I)ᵀ: (..., r)`` for ``x: (..., in)``, in the factors' dtype."""
        A = self._psoft_A_cache[adapter_name]
        x = self.psoft_dropout[adapter_name](x.to(A.dtype))
        R_minus_I = self.psoft_R[adapter_name].minus_identity().to(A.dtype)
        return F.linear(F.linear(x, A), R_minus_I)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = scaling · B (R − I) A: (out, in)`` in the base weight's dtype."""
        A, B = self._psoft_A_cache[adapter_name], self._psoft_B_cache[adapter_name]
        R_minus_I = self.psoft_R[adapter_name].minus_identity().to(A.dtype)
        delta = (B @ R_minus_I @ A) * self.scaling[adapter_name]
        return delta.to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``W + ΔW`` on a linear weight: expressible as a LoRA (the reference says yes too)."""
        return True

    # ------------------------------------------------------------------ forward
    def _add(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result + scaling · hidden Bᵀ``: one ``addmm_`` into ``result`` when ``inplace`` allows it."""
        B, scaling = self._psoft_B_cache[adapter_name], self.scaling[adapter_name]
        hidden = self.hidden(adapter_name, x)
        if inplace and can_update_inplace(result, B):
            result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), B.t(), alpha=scaling)
            return result
        # one rounding to the result's dtype, after the add (as the reference)
        return (result + F.linear(hidden, B) * scaling).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``."""
        return self.forward_adding(x, self._add, self._inplace, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- registry hooks
def layer_options(name: str, module: nn.Module, config: Any) -> dict[str, Any]:
    """Per-layer facts: the rank, after checking that the layer is an ``nn.Linear`` with ``r <= min(in, out)``."""
    assert isinstance(config, PsoftConfig)
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    require_kind(name, module, (LINEAR,), "PSOFT")
    if config.r > min(base.in_features, base.out_features):
        raise ConfigError("r", config.r, f"target {name!r} is a Linear({base.in_features}, {base.out_features}); "
                          f"allowed: r <= min(in_features, out_features) = "
                          f"{min(base.in_features, base.out_features)}")
    if config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out=True is not compatible with `torch.nn.Linear` ({name!r}); PSOFT uses "
                      "fan_in_fan_out=False there.", PeftWarning, stacklevel=6)
    return {"kind": LINEAR, "r": config.r}


def create_layer(module: nn.Module, options: dict[str, Any], config: Any, adapter_name: str,
                 dtype: torch.dtype) -> PsoftLayer:
    """Wrap ``module`` (or reuse its PSOFT layer) and add adapter ``adapter_name``."""
    layer = module if isinstance(module, PsoftLayer) else PsoftLayer(module)
    layer.update_layer(adapter_name, options["r"], config, dtype)
    return layer
