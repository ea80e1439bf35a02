"""``PsoftConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...errors import PeftWarning
from ...types import PeftType

#: ``ab_svd_init`` values: how the SVD factors are split between the frozen ``A: (r, in)`` and ``B: (out, r)``
AB_SVD_INITS = ("pissa_init", "psoft_init")
#: ``psoft_svd`` values: ``torch.linalg.svd`` or the seeded ``torch.svd_lowrank``
SVD_BACKENDS = ("full", "lowrank")


@dataclass
class PsoftConfig(PeftConfig):
    """Configuration of a PSOFT adapter (field names and defaults of the reference's ``PsoftConfig``).

    PSOFT (orthogonal fine-tuning in the principal subspace) splits the top-``r`` SVD of a linear weight
    ``W: (out, in)`` into frozen factors ``A: (r, in)`` and ``B: (out, r)`` and trains an ``r × r`` transform ``R``
    between them: ``ΔW = scaling · B (R − I) A`` with ``scaling = psoft_alpha / r``. ``psoft_init`` takes
    ``A = Vhᵣ`` (orthonormal rows) and ``B = Uᵣ diag(Sᵣ) / scaling``; ``pissa_init`` splits ``√(Sᵣ / scaling)``
    between both. ``R`` is the Cayley transform ``(I + Q)(I − Q)⁻¹`` of a skew-symmetric ``Q`` (``psoft_orth``;
    the ``r(r−1)/2`` entries above the diagonal are trained; with ``use_cayley_neumann`` a truncated Neumann series
    replaces the inverse) or a free ``r × r`` matrix, optionally scaled by vectors on its output (``psoft_mag_b``)
    and input (``psoft_mag_a``) side. ``A`` and ``B`` are not saved: they are rebuilt from the base weight on load
    (``psoft_svd="lowrank"`` seeds its random projection with ``random_seed`` so the rebuild is exact). As in the
    reference, a saved ``R`` reproduces its outputs only where the SVD returns the same singular vectors, signs
    included: another device or LAPACK build may flip a pair ``(u_i, v_i)``, which ``R`` does not follow.

    ``fan_in_fan_out`` is accepted for the file format; PSOFT adapts ``nn.Linear`` only, where it must be False
    (the reference resets it with a warning, peftkit warns and leaves the config unchanged).
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    psoft_alpha: int = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PSOFT
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        self._check_layers()
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: a positive int (r >= 1)")
        check(is_number(self.psoft_alpha), "psoft_alpha", self.psoft_alpha, "allowed: a number")
        check(is_number(self.psoft_dropout) and 0 <= self.psoft_dropout <= 1, "psoft_dropout", self.psoft_dropout,
              "allowed: a float with 0 <= psoft_dropout <= 1")
        check(self.ab_svd_init in AB_SVD_INITS, "ab_svd_init", self.ab_svd_init, f"allowed: one of {list(AB_SVD_INITS)}")
        check(self.psoft_svd in SVD_BACKENDS, "psoft_svd", self.psoft_svd, f"allowed: one of {list(SVD_BACKENDS)}")
        check(is_int(self.psoft_svd_lowrank_niter) and self.psoft_svd_lowrank_niter >= 0, "psoft_svd_lowrank_niter",
              self.psoft_svd_lowrank_niter, "allowed: an int >= 0")
        check(is_int(self.random_seed), "random_seed", self.random_seed, "allowed: an int")
        for name in ("fan_in_fan_out", "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann",
                     "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        self._check_cayley_neumann()
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != 10:
            warnings.warn(f"`psoft_svd_lowrank_niter` is only used when `psoft_svd='lowrank'`. Got "
                          f"psoft_svd={self.psoft_svd!r}, so psoft_svd_lowrank_niter={self.psoft_svd_lowrank_niter} "
                          "will be ignored.", PeftWarning, stacklevel=3)

    def _check_layers(self) -> None:
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern, str_targets=True)

    def _check_cayley_neumann(self) -> None:
        terms, eps = self.num_cayley_neumann_terms, self.cayley_neumann_eps
        check(is_int(terms), "num_cayley_neumann_terms", terms, "allowed: a positive int")
        check(eps is None or is_number(eps), "cayley_neumann_eps", eps, "allowed: None or a float in (0, 1)")
        if self.use_cayley_neumann:
            check(terms > 0, "num_cayley_neumann_terms", terms, "allowed: a positive int (>= 1)")
            check(eps is None or 0.0 < eps < 1.0, "cayley_neumann_eps", eps, "allowed: None or a float in (0, 1)")
            return
        if terms != 5:
            warnings.warn("`num_cayley_neumann_terms` is only used when `use_cayley_neumann=True`. Since "
                          f"`use_cayley_neumann=False`, `num_cayley_neumann_terms={terms}` will be ignored.",
                          PeftWarning, stacklevel=4)
        if eps is not None:
            warnings.warn("`cayley_neumann_eps` is only used when `use_cayley_neumann=True`. Since "
                          f"`use_cayley_neumann=False`, `cayley_neumann_eps={eps}` will be ignored.",
                          PeftWarning, stacklevel=4)
