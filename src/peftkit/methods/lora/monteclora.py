"""MonteCLoRA (``LoraConfig.monteclora_config``): Monte-Carlo sampling on top of a LoRA adapter's ``lora_A``.

The reference's ``MontecloraLinearVariant`` (``peft/tuners/lora/variants.py``) and ``MontecloraSampler``
(``peft/tuners/lora/monteclora.py``). Each targeted ``nn.Linear`` gets, per adapter, a sampler
``lora_monteclora_sampler[adapter]`` holding the variational parameters ``std_prior: (r,)`` and
``expert_weights_prior: (N,)`` (``N = num_samples``) and the buffers ``gaussian_var_prior: (r, r)`` and
``expert_weights: (N,)`` (all saved, as the reference saves them). In eval mode the layer is plain LoRA,
``y = base(x) + scaling * B(A x)``. In training mode each forward draws ``z_mvn: (N, in, r)`` and
``z_dirichlet: (N,)`` standard normal and ``z_wishart: (r, r) ~ Wishart(df=r, I)``, and computes

    s = exp(std_prior);                       Σ = diag(max(diag(diag(s) z_wishart diag(s)), 1e-3))
    noise_n = sample_scaler * z_mvn_n @ chol(Σ)                                   (in, r) per sample n
    w = softmax(L z_dirichlet + μ)            (the Laplace approximation of Dirichlet(α = exp(expert_weights_prior)))
    A' = (Σ_n w_n (Aᵀ + noise_n))ᵀ;           y = base(x) + scaling * B(A' dropout(x))

recording ``Σ`` and ``w`` in the buffers (the loss uses the last forward's with their graph, as the reference) for
:func:`monteclora_loss`, the
variational regulariser (KL terms weighted by ``kl_loss_weight``, plus ``Σ w²`` with ``use_entropy``) that the user
adds to the task loss (``model._get_monteclora_loss()``, as the reference: it is not added automatically). ``lora_B``
starts at zero, so the adapter is the identity at init in both modes. Merging writes plain LoRA's ``scaling * B A``
(the samples are ignored, as the reference).

The reference pre-draws ``buffer_size`` samples at a time (``buffer_size * N * in * r`` numbers per layer); peftkit
draws each forward's sample when it is needed, from the same distribution, so ``buffer_size`` is accepted, validated
and saved but changes nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import as_subconfig
from ...errors import ConfigError, ConfigTypeError, PeftWarning
from .variants import LoraVariant

if TYPE_CHECKING:
    from .layers import LoraLayer

#: the attribute of a LoRA layer holding its samplers (``nn.ModuleDict``), the reference's name (saved keys)
SAMPLER_ATTR = "lora_monteclora_sampler"


@dataclass
class MontecloraConfig:
    """The reference's ``MontecloraConfig``: ``num_samples`` Monte-Carlo samples per training forward, the
    entropy term (``use_entropy``), the Dirichlet prior's concentration, the noise scale (``sample_scaler``), the
    KL weight, and ``buffer_size`` (accepted for compatibility; see the module docstring)."""

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150

    def __post_init__(self) -> None:
        for name in ("num_samples", "buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigTypeError(f"monteclora_config.{name}", value, "allowed: an int >= 1")
            if value < 1:
                raise ConfigError(f"monteclora_config.{name}", value, "allowed: an int >= 1")
        for name in ("dirichlet_prior", "sample_scaler", "kl_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigTypeError(f"monteclora_config.{name}", value, "allowed: a finite number")
        if self.dirichlet_prior <= 0:
            raise ConfigError("monteclora_config.dirichlet_prior", self.dirichlet_prior, "allowed: a number > 0")
        if not isinstance(self.use_entropy, bool):
            raise ConfigTypeError("monteclora_config.use_entropy", self.use_entropy, "allowed: True or False")


def as_monteclora_config(value: object) -> MontecloraConfig | None:
    """``LoraConfig.monteclora_config`` as a :class:`MontecloraConfig`: a dict (as loaded from
    ``adapter_config.json``) is converted, None and instances pass through."""
    return as_subconfig("monteclora_config", value, MontecloraConfig)


class _Live(dict):  # type: ignore[type-arg]
    """Graph-attached tensors of a sampler's last training forward. Not copied: ``copy.deepcopy`` of a trained
    model (which cannot copy non-leaf tensors) gets an empty one, so the copy's loss uses its buffers' values."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Live:
        return _Live()


class MontecloraSampler(nn.Module):
    """The variational state of one adapter of one layer (the reference's ``MontecloraSampler``; same parameter
    and buffer names, so the saved keys match). ``in_features``: the layer's input size; ``rank``: ``r``."""

    def __init__(self, in_features: int, rank: int, config: MontecloraConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.rank = rank
        self.num_samples = config.num_samples
        self.use_entropy = config.use_entropy
        self.dirichlet_prior = config.dirichlet_prior
        self.sample_scaler = config.sample_scaler
        self.kl_loss_weight = config.kl_loss_weight
        n = config.num_samples
        self.std_prior = nn.Parameter(torch.rand(rank, dtype=dtype, device=device))  # U[0, 1), as the reference
        self.expert_weights_prior = nn.Parameter(torch.rand(n, dtype=dtype, device=device))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, dtype=dtype, device=device))
        self.register_buffer("expert_weights", torch.full((n,), 1.0 / n, dtype=dtype, device=device))
        self._live = _Live()  # the last training forward's Σ and w, attached to its graph (for the loss)

    def draw(self) -> dict[str, torch.Tensor]:
        """One sample of the noise: ``z_mvn: (N, in, r)``, ``z_dirichlet: (N,)`` standard normal and
        ``z_wishart: (r, r) ~ Wishart(df=r, I)`` (drawn in float32, as the reference), in the parameters' dtype."""
        device, dtype = self.std_prior.device, self.std_prior.dtype
        with torch.no_grad():
            z_mvn = torch.randn(self.num_samples, self.in_features, self.rank, device=device, dtype=dtype)
            z_dirichlet = torch.randn(self.num_samples, device=device, dtype=dtype)
            z_wishart = wishart_identity(self.rank, device).to(dtype)
        return {"z_mvn": z_mvn, "z_wishart": z_wishart, "z_dirichlet": z_dirichlet}

    def forward(self, sample: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise: (N, in, r), expert_weights: (N,))`` for ``sample`` (default: :meth:`draw`); records ``Σ`` and
        the weights in the buffers for :meth:`variational_loss`."""
        sample = self.draw() if sample is None else sample
        dtype = self.std_prior.dtype
        z_mvn, z_wishart, z_dirichlet = (sample[k].to(self.std_prior.device, dtype)
                                         for k in ("z_mvn", "z_wishart", "z_dirichlet"))
        s = torch.exp(self.std_prior)
        # Σ = diag(diag(S Z S)) for S = diag(s), clipped: diagonal, so its Cholesky factor is sqrt(diag(Σ))
        var_diag = torch.clip(s * torch.diagonal(z_wishart) * s, min=1e-3)  # (r,)
        self._record("gaussian_var_prior", torch.diag(var_diag))
        noise = self.sample_scaler * torch.nan_to_num(z_mvn * var_diag.sqrt(), nan=1e-3)  # z_mvn @ chol(Σ)
        weights = torch.softmax(self._dirichlet_logits(torch.exp(self.expert_weights_prior), z_dirichlet), dim=-1)
        self._record("expert_weights", weights)
        return noise, weights

    def _record(self, buffer: str, value: torch.Tensor) -> None:
        """Keep ``value`` for :meth:`variational_loss` (with its graph) and its values in the saved buffer."""
        self._live[buffer] = value
        with torch.no_grad():
            getattr(self, buffer).copy_(value)

    def _state(self, buffer: str) -> torch.Tensor:
        """The last forward's ``buffer`` with its graph when there is one, else the buffer (e.g. as loaded)."""
        value = self._live.get(buffer)
        return getattr(self, buffer) if value is None else value

    def _dirichlet_logits(self, alpha: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``L z + μ`` for ``alpha, z: (N,)``: the log-normal (Laplace) approximation of ``Dirichlet(alpha)``, with
        the diagonal covariance ``Σ = diag(d) + eps I`` of the reference, whose Cholesky factor is ``sqrt(d + eps)``."""
        eps, n = 1e-6, self.num_samples
        alpha = torch.clamp(alpha, min=eps)
        mu = torch.log(alpha) - torch.log(alpha).mean()
        diag = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / n**2 * (1 / alpha).sum(), min=eps)
        return (diag + eps).sqrt() * z + mu

    def variational_loss(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(kl_loss_weight * (KL_dirichlet + KL_wishart + KL_gaussian), entropy)`` in training mode (entropy
        ``Σ w²`` with ``use_entropy``, else 0); ``(0.0, 0.0)`` in eval mode, as the reference."""
        if not self.training:
            return 0.0, 0.0
        kl = self._dirichlet_kl(torch.exp(self.expert_weights_prior)) + self._wishart_kl(
            torch.diag(torch.exp(self.std_prior))) + self._gaussian_kl(self._state("gaussian_var_prior"))
        entropy = (self._state("expert_weights")**2).sum() if self.use_entropy else 0
        return self.kl_loss_weight * kl, entropy

    def _dirichlet_kl(self, alpha2: torch.Tensor) -> torch.Tensor:
        alpha1 = torch.full((self.num_samples,), float(self.dirichlet_prior), device=alpha2.device)
        def gamma(t: torch.Tensor) -> torch.Tensor:
            return torch.lgamma(t).exp()  # the reference's formula (log of exp of lgamma, overflow included)

        return (torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum()))
                + torch.log(gamma(alpha2) / gamma(alpha1)).sum()
                + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum())

    def _wishart_kl(self, std: torch.Tensor) -> torch.Tensor:
        var = torch.diag((std @ std.T).diag())
        r = self.rank
        return 0.5 * (-torch.log(var).trace() * r + var.trace() * r - r**2)

    def _gaussian_kl(self, var: torch.Tensor) -> torch.Tensor:
        var = torch.clamp(var, min=1e-6)
        return self.num_samples * 0.5 * (var.trace() - torch.log(var).trace() - self.rank)


class MontecloraVariant(LoraVariant):
    """MonteCLoRA for one adapter of a linear LoRA layer (see the module docstring)."""

    name = "MonteCLoRA"
    plain_merge = True  # the samples are ignored: W += scaling * B A (and the LoRA bias)

    def __init__(self, config: MontecloraConfig) -> None:
        self.config = config

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Add ``lora_monteclora_sampler[adapter_name]`` (a held adapter attribute: saved, trained, deleted with
        the adapter), on the base weight's device, in ``lora_A``'s dtype."""
        if SAMPLER_ATTR not in layer._modules:
            layer.lora_monteclora_sampler = nn.ModuleDict()
            layer.adapter_layer_names = (*layer.adapter_layer_names, SAMPLER_ATTR)  # this layer only
        A = layer.lora_A[adapter_name].weight
        device = layer.adapted_weight().device
        layer.lora_monteclora_sampler[adapter_name] = MontecloraSampler(A.shape[1], A.shape[0], self.config,
                                                                       device, A.dtype)

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``result: (..., out)`` plus ``scaling * B(A' dropout(x))`` for ``x: (..., in)``; ``A' = A`` in eval mode,
        the sampled average in training mode (out of place)."""
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = x.to(lora_A.weight.dtype)
        weight_A = lora_A.weight  # (r, in)
        if layer.training:
            x = layer.lora_dropout[adapter_name](x)
            weight_A = sampled_weight(lora_A.weight, layer.lora_monteclora_sampler[adapter_name])
        update = lora_B(F.linear(x, weight_A)) * layer.scaling[adapter_name]
        return (result + update).to(base_out.dtype)


def wishart_identity(r: int, device: torch.device) -> torch.Tensor:
    """``W = G Gᵀ: (r, r) ~ Wishart(df=r, I)`` in float32 for ``G: (r, r)`` standard normal (the definition; the
    reference draws the same distribution by Bartlett's construction, ``Wishart._bartlett_sampling``)."""
    G = torch.randn(r, r, device=device, dtype=torch.float32)
    return G @ G.T


def sampled_weight(weight_A: torch.Tensor, sampler: MontecloraSampler,
                   sample: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(Σ_n w_n (Aᵀ + noise_n))ᵀ: (r, in)`` for ``weight_A: (r, in)`` and one sample of ``sampler``; ``A`` itself
    (with a warning) when the sample has NaNs, as the reference."""
    noise, weights = sampler(sample)  # (N, in, r), (N,)
    bad = torch.isnan(noise).any() | torch.isnan(weights).any()
    if torch.compiler.is_compiling():  # no data-dependent branch (a graph break) in a compiled forward, no warning
        return torch.where(bad, weight_A, torch.einsum("n,nij->ij", weights, weight_A.T + noise).T)
    if bad:
        warnings.warn("Monteclora sampling produced NaNs, using base weights.", PeftWarning, stacklevel=3)
        return weight_A
    return torch.einsum("n,nij->ij", weights, weight_A.T + noise).T


def monteclora_variant(layer: LoraLayer, value: object) -> LoraVariant | None:
    """:data:`~.variants.VARIANT_FIELDS` factory for ``monteclora_config``: linear layers only (as the reference);
    None (plain LoRA) for a quantized linear, which the reference's quantized layers adapt without MonteCLoRA
    (:func:`warn_quantized_targets` names them)."""
    from .layers import Linear
    from .quantized import QuantLinear

    config = as_monteclora_config(value)
    assert config is not None
    if isinstance(layer, QuantLinear):
        return None
    if not isinstance(layer, Linear):
        kind = type(layer.get_base_layer()).__name__
        raise ConfigError("monteclora_config", value, f"MonteCLoRA adapts linear layers only (as the reference); a "
                          f"target is a {kind} ({type(layer).__name__}). Exclude it from target_modules or set "
                          "monteclora_config=None")
    return MontecloraVariant(config)


def warn_quantized_targets(config: Any, planned: Sequence[tuple[str, nn.Module]]) -> None:
    """Warn, naming them, about the quantized linears among ``planned`` (``(module name, module)``) when
    ``config.monteclora_config`` is set: they get plain LoRA, as in the reference (whose quantized layers ignore
    ``monteclora_config`` silently), so checkpoints move between the libraries."""
    from ...quantization import is_quantized

    if getattr(config, "monteclora_config", None) is None:
        return
    quantized = [name for name, module in planned
                 if is_quantized(module.get_base_layer() if hasattr(module, "get_base_layer") else module)]
    if quantized:
        more = " ..." if len(quantized) > 5 else ""
        warnings.warn(f"MonteCLoRA is not applied to the quantized layers {quantized[:5]}{more}: they get plain LoRA, "
                      "as in 🤗 PEFT (its quantized LoRA layers have no MonteCLoRA)", PeftWarning, stacklevel=6)


def monteclora_loss(model: nn.Module, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
    """The reference's ``LoraModel._get_monteclora_loss``: the mean over the MonteCLoRA samplers of
    ``adapter_names`` (default: the active adapters of ``model``) of ``kl + entropy`` (:meth:`MontecloraSampler.
    variational_loss`); ``0.0`` when there is none. Add it to the task loss during training."""
    from .layers import LoraLayer

    if adapter_names is None:
        adapter_names = list(getattr(model, "active_adapters", ["default"]))
    elif isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    total: torch.Tensor | float = 0.0
    count = 0
    for module in model.modules():
        samplers = module._modules.get(SAMPLER_ATTR) if isinstance(module, LoraLayer) else None
        if samplers is None:
            continue
        for name in adapter_names:
            if name in samplers:
                kl, entropy = samplers[name].variational_loss()
                total = total + kl + entropy
                count += 1
    return total / count if count else 0.0


class MontecloraTunerMixin:
    """Tuner method of the reference's ``LoraModel`` for MonteCLoRA."""

    def _get_monteclora_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """See :func:`monteclora_loss`."""
        return monteclora_loss(self, adapter_names)  # type: ignore[arg-type]
