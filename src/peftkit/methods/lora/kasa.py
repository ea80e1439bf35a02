"""KaSA (Knowledge-aware Singular-value Adaptation, ``LoraConfig.kasa_config``; arXiv:2412.06071).

KaSA changes LoRA on a linear layer in two ways (the reference's ``KasaLinearVariant``,
``peft/tuners/lora/variants.py``):

1. When the adapter is created, the frozen base weight ``W: (out, in)`` is replaced by its rank ``k - r`` SVD
   approximation (``k = min(in, out)``): ``W = U S Vᵀ`` in float32, the ``r`` smallest singular components are
   dropped. This is destructive: disabling, unloading or deleting the adapter does not restore ``W``.
2. The update carries a learnable diagonal ``lora_diag: (r,)`` between ``A: (r, in)`` and ``B: (out, r)``:

       y = W_trunc x + scaling * B diag(lora_diag) A dropout(x),   ΔW = scaling * (B * lora_diag) @ A

``B`` starts at zero, so the adapter adds nothing at init (but the model differs from the original one by the
truncation). ``lora_diag`` is saved as ``<module>.lora_diag`` and trained with the factors. Merging adds ``ΔW`` to
the truncated weight; unmerging subtracts it. The paper's two regularisers are :func:`kasa_loss` (the reference's
``LoraModel._get_kasa_loss``), which the user adds to the task loss.

The layer's ``get_delta_weight`` is ``ΔW`` with ``lora_diag`` (:meth:`KasaVariant.delta_weight`), so safe merging,
``check_merge`` and ``add_weighted_adapter`` see the real update; ``add_weighted_adapter`` folds each source's
diagonal into its ``A`` and gives the new (KaSA) adapter ``lora_diag = 1``.

Differences from the reference: the truncation needs a materialised base weight when the adapter is created (the
reference defers it to the first forward when the base weight is on the meta device); peftkit raises instead. The
reference's ``get_delta_weight`` and ``add_weighted_adapter`` leave ``lora_diag`` out (its combined adapter keeps a
random diagonal); peftkit combines the full updates and refuses a combined rank that would truncate the base again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import ConfigError, ConfigTypeError, MergeError
from ...injection.apply import is_probing
from .variants import LoraVariant

if TYPE_CHECKING:
    from .layers import LoraLayer

#: the layer attribute (an ``nn.ParameterDict`` by adapter name) holding the learnable singular values
DIAG = "lora_diag"


@dataclass
class KasaConfig:
    """The reference's ``KasaConfig``: coefficients of the paper's auxiliary regularisers (:func:`kasa_loss`).

    Args:
        beta: weight of the singular-value penalty ``sum(lora_diag ** 2)`` (paper Eq. 9-10); >= 0.
        gamma: weight of the orthogonality penalty ``‖BᵀB - I‖_F + ‖AAᵀ - I‖_F`` (paper Eq. 11); >= 0.
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):  # the reference: TypeError from `<`
                raise ConfigTypeError(f"kasa_config.{name}", value, "a non-negative number is required")
            if value < 0:
                raise ConfigError(f"kasa_config.{name}", value, "it must be non-negative")


def truncate_weight(weight: torch.Tensor, r: int) -> torch.Tensor:
    """``weight: (out, in)`` without its ``r`` smallest singular components: ``U[:, :k-r] S[:k-r] Vh[:k-r]`` with
    ``k = min(out, in)``, computed in float32 and returned in ``weight``'s dtype, shape ``(out, in)``."""
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    keep = S.shape[0] - r
    return ((U[:, :keep] * S[:keep]) @ Vh[:keep, :]).to(weight.dtype)


class KasaVariant(LoraVariant):
    """KaSA on an ``nn.Linear`` (see the module doc)."""

    name = "KaSA"
    #: the base weight is truncated even when a checkpoint fills the adapter's tensors (a load)
    init_allocates = True

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Create ``lora_diag[adapter_name]: (r,)`` (``randn``, as the reference; ``B = 0`` keeps the update zero)
        and truncate the base weight. On a load's meta probe only the (meta) diagonal is created."""
        check_rank(layer, layer.r[adapter_name])
        if DIAG not in layer._modules:
            layer._modules[DIAG] = nn.ParameterDict()
            layer.adapter_layer_names = (*layer.adapter_layer_names, DIAG)  # saved, trained, deleted with A / B
        r = layer.r[adapter_name]
        A = layer.lora_A[adapter_name].weight
        layer._modules[DIAG][adapter_name] = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))
        if is_probing():  # a load's throw-away probe: nothing may be read or rewritten
            return
        base = layer.get_base_layer()
        if base.weight.is_meta:
            raise ConfigError("kasa_config", KasaConfig.__name__, "KaSA truncates the base weight by SVD when the adapter is "
                              "created, so the base model's weights must be materialised (not on the meta device)")
        with torch.no_grad():
            base.weight.data = truncate_weight(base.weight, r)

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in)``, ``result: (..., out)``: ``result + scaling * B((A(dropout(x)) * lora_diag))``, out of
        place, in ``result``'s dtype."""
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x_in = layer._cast_input_dtype(x, lora_A.weight.dtype)
        hidden = lora_A(layer.lora_dropout[adapter_name](x_in)) * layer._modules[DIAG][adapter_name]  # (..., r)
        return (result + lora_B(hidden) * layer.scaling[adapter_name]).to(result.dtype)

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``scaling * (B * lora_diag) @ A``: ``(out, in)`` in the base weight's dtype (float32 arithmetic for
        half-precision factors on CPU, as the reference)."""
        A = layer.lora_A[adapter_name].weight
        B = layer.lora_B[adapter_name].weight
        diag = layer._modules[DIAG][adapter_name]
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B, diag = A.float(), B.float(), diag.float()
        delta = (B * diag) @ A * layer.scaling[adapter_name]
        return delta.to(layer.get_base_layer().weight.dtype)

    def combine_source(self, layer: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor,
                       rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(lora_diag) A, B)`` (``A: (r, in)``, ``B: (out, r)``): plain factors of the same update. The new
        adapter (KaSA too) truncates the base by its rank when created, so a ``rank`` above the depth already cut
        (the largest KaSA rank in the layer) would change the base: :class:`ConfigError` then, before any change."""
        depth = max(layer.r[name] for name, v in layer._variants.items() if isinstance(v, KasaVariant))
        if rank > depth:
            raise ConfigError("combination_type", f"rank {rank}",
                              f"a combined KaSA adapter of rank {rank} would truncate the base weights of a layer "
                              f"again (they were cut by r = {depth}); combine to a rank <= {depth}, e.g. "
                              f"combination_type='svd' with svd_rank <= {depth}")
        diag = layer._modules[DIAG][adapter_name].detach().to(A.dtype)
        return A * diag.unsqueeze(-1), B

    def init_combined(self, layer: LoraLayer, adapter_name: str) -> None:
        """``lora_diag = 1``: the combined factors already hold the sources' diagonals."""
        with torch.no_grad():
            layer._modules[DIAG][adapter_name].fill_(1.0)

    def merge(self, layer: LoraLayer, adapter_name: str, safe_merge: bool) -> None:
        """``W <- W + ΔW`` (``W`` is the truncated weight)."""
        weight = layer.get_base_layer().weight
        new = weight.detach() + self.delta_weight(layer, adapter_name)
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        with torch.no_grad():
            weight.data.copy_(new)

    def unmerge(self, layer: LoraLayer, adapter_name: str) -> None:
        """``W <- W - ΔW``: back to the truncated weight (never to the original one)."""
        weight = layer.get_base_layer().weight
        with torch.no_grad():
            weight.data.sub_(self.delta_weight(layer, adapter_name))


def kasa_variant(layer: LoraLayer, value: object) -> LoraVariant:
    """The factory of ``VARIANT_FIELDS["kasa_config"]``: KaSA adapts plain ``nn.Linear`` layers (not ``Conv1D``,
    ``fan_in_fan_out``, quantized, embedding or convolution layers, as the reference) of rank ``r < min(in, out)``.
    Raises :class:`ConfigError` otherwise."""
    from .layers import Linear
    from .quantized import QuantLinear

    if type(layer) is not Linear or isinstance(layer, QuantLinear) or layer.fan_in_fan_out:
        kind = type(layer.get_base_layer()).__name__
        raise ConfigError("kasa_config", value, f"KaSA adapts nn.Linear layers only (as the reference); a target is "
                          f"a {kind}{' with fan_in_fan_out=True' if layer.fan_in_fan_out else ''}. Exclude it from "
                          "target_modules or set kasa_config=None")
    return KasaVariant()


def check_rank(layer: LoraLayer, r: int) -> None:
    """KaSA keeps at least one singular component: ``r < min(in_features, out_features)``, else ConfigError."""
    k = min(layer.in_features, layer.out_features)
    if r >= k:
        raise ConfigError("r", r, f"KaSA requires r < min(in_features, out_features) = {k}, so that at least one "
                          "singular component of the base weight is kept after the truncation")


def check_kasa_mixing(kasa_config: object, model: nn.Module) -> None:
    """KaSA rewrites the base weights, so a model holds KaSA adapters only or none (as the reference): raise
    :class:`ConfigError` (a ``ValueError``) if a new adapter (KaSA when ``kasa_config`` is not None) would sit
    beside one of the other kind in ``model``'s LoRA layers."""
    from .layers import LoraLayer

    uses_kasa = kasa_config is not None

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.adapter_names():
            other = isinstance(module._variants.get(adapter), KasaVariant)
            if other is not uses_kasa:
                raise ConfigError("kasa_config", kasa_config,
                                  "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the "
                                  f"base weights: the new adapter {'uses' if uses_kasa else 'does not use'} KaSA but "
                                  f"adapter {adapter!r} (in {name!r}) {'does not' if uses_kasa else 'does'}")


def kasa_layer_loss(layer: LoraLayer, adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
    """``beta * sum(lora_diag²) + gamma * (‖BᵀB - I‖_F + ‖AAᵀ - I‖_F)`` for one layer (``A: (r, in)``,
    ``B: (out, r)``), a float32 scalar."""
    diag = layer._modules[DIAG][adapter_name].float()
    A = layer.lora_A[adapter_name].weight.float()
    B = layer.lora_B[adapter_name].weight.float()
    eye = torch.eye(diag.shape[0], device=diag.device, dtype=torch.float32)
    ortho = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
    return beta * (diag ** 2).sum() + gamma * ortho


def kasa_loss(layers: Iterable[nn.Module], configs: dict[str, Any], adapter_names: list[str]
              ) -> torch.Tensor | float:
    """Sum of :func:`kasa_layer_loss` over the KaSA layers among ``layers`` and the adapters ``adapter_names``,
    with each adapter's ``kasa_config`` coefficients; 0.0 when there is none."""
    total: torch.Tensor | float = 0.0
    for layer in layers:
        holder = getattr(layer, "_modules", {}).get(DIAG)
        if holder is None:
            continue
        for name in adapter_names:
            if name in holder:
                sub = configs[name].kasa_config
                total = total + kasa_layer_loss(layer, name, sub.beta, sub.gamma)  # type: ignore[arg-type]
    return total


class KasaTunerMixin:
    """Mixed into ``LoraModel``: the reference's ``_get_kasa_loss``."""

    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """The KaSA regularisation (:func:`kasa_loss`) of ``adapter_names`` (default: the active adapters), summed
        over the layers: add it to the task loss while training."""
        if adapter_names is None:
            names = list(self.active_adapters)  # type: ignore[attr-defined]
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        return kasa_loss(self.model.modules(), self.peft_config, names)  # type: ignore[attr-defined]
