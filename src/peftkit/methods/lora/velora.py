"""VeLoRA (``LoraConfig.velora_config``; arXiv:2405.17991): LoRA whose ``lora_A`` keeps a compressed input for
its backward pass (the reference's ``VeloraLinearVariant`` and ``peft/tuners/lora/velora.py``).

The forward values are plain LoRA's. What changes is the record kept for the gradient of ``A: (r, in)``: instead of
the input ``x: (T, in)`` (``T`` tokens), each token is cut into ``G = num_groups`` sub-tokens of
``D = ceil(in / G)`` features (zero-padded to ``G * D``) and each sub-token is projected on one unit vector
``v: (D,)`` (the adapter's ``lora_velora_embed``, a saved buffer), which keeps ``c: (T, G)``. Backward rebuilds
``x̂ = scale * (c ⊗ v)[:, :in]`` and uses ``dA = gᵀ x̂`` (``g: (T, r)`` the gradient at ``A``'s output); the gradient
for the input stays exact (``g A``).

``v`` comes from ``init_type``: ``"random"`` (a normalised ``randn`` at creation), ``"batch_average"`` (the
normalised mean sub-token of each training batch, recomputed at every training forward) or ``"batch_average_once"``
(of the first training batch only). Out of training (or without autograd) the adapter is plain LoRA, so eval
outputs, merging and files are LoRA's plus the buffer. VeLoRA adapts ``nn.Linear`` (and GPT-2 ``Conv1D``) layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ...errors import ConfigError, ConfigTypeError
from ...injection.apply import is_probing
from ...layers.buffers import BufferDict
from .variants import LoraVariant

if TYPE_CHECKING:
    from .layers import LoraLayer

#: the layer attribute (a :class:`BufferDict` by adapter name) holding each adapter's projection ``v: (D,)``
EMBED = "lora_velora_embed"
INIT_TYPES = ("batch_average", "batch_average_once", "random")


@dataclass
class VeloraConfig:
    """The reference's ``VeloraConfig``.

    Args:
        num_groups: sub-tokens per token (``G`` > 0); more groups, finer reconstruction, more memory.
        scale: factor of the reconstructed activations in backward (> 0).
        init_type: how the projection is chosen: ``"batch_average"``, ``"batch_average_once"`` or ``"random"``.
    """

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __post_init__(self) -> None:
        # a wrong type is a ConfigTypeError (the reference: TypeError from `<=`), a bad value a ConfigError
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int):
            raise ConfigTypeError("velora_config.num_groups", self.num_groups, "a positive integer is required")
        if self.num_groups <= 0:
            raise ConfigError("velora_config.num_groups", self.num_groups, "a positive integer is required")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConfigTypeError("velora_config.scale", self.scale, "a positive number is required")
        if self.scale <= 0:
            raise ConfigError("velora_config.scale", self.scale, "a positive number is required")
        if self.init_type not in INIT_TYPES:
            raise ConfigError("velora_config.init_type", self.init_type, f"allowed: {list(INIT_TYPES)}")


# ---------------------------------------------------------------------- tensor math (no state)
def group_dim(in_features: int, num_groups: int) -> int:
    """``D = ceil(in_features / num_groups)``."""
    return (in_features + num_groups - 1) // num_groups


def sub_tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``x: (..., in) -> (T, G, D)``, zero-padded to ``G * D`` features (``T`` = all leading dims)."""
    D = group_dim(x.shape[-1], num_groups)
    if x.shape[-1] != num_groups * D:
        x = F.pad(x, (0, num_groups * D - x.shape[-1]))
    return x.reshape(-1, num_groups, D)


def compress(x: torch.Tensor, embed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``x: (..., in)``, ``embed: (D,)`` -> ``c: (T, G)``, each sub-token's coordinate along ``embed``."""
    return torch.einsum("tgd,d->tg", sub_tokens(x, num_groups), embed)


def reconstruct(c: torch.Tensor, embed: torch.Tensor, in_features: int, scale: float) -> torch.Tensor:
    """``c: (T, G)``, ``embed: (D,)`` -> ``x̂: (T, in)`` = ``scale * (c ⊗ embed)`` without the padding."""
    return (c.unsqueeze(-1) * embed.view(1, 1, -1)).reshape(c.shape[0], -1)[:, :in_features] * scale


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` in float32; the normalised all-ones vector when ``v`` is zero."""
    v = v.float()
    v = torch.where(torch.linalg.vector_norm(v) == 0, torch.ones_like(v), v)  # no data-dependent branch (dynamo)
    return v / torch.linalg.vector_norm(v)


class VeloraLinearFn(torch.autograd.Function):
    """``x @ weight.T`` (``x: (..., in)``, ``weight: (r, in)``) that saves ``compress(x)`` instead of ``x``: the
    weight's gradient uses the reconstruction, the input's is exact."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, num_groups: int,
                scale: float) -> torch.Tensor:
        ctx.x_shape, ctx.x_dtype, ctx.scale, ctx.num_groups = tuple(x.shape), x.dtype, scale, num_groups
        ctx.save_for_backward(compress(x, embed.to(x.dtype), num_groups), weight, embed)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, weight, embed = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (T, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(g.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_hat = reconstruct(c.to(g.dtype), embed.to(g.dtype), ctx.x_shape[-1], ctx.scale)
            grad_w = (g.T @ x_hat).to(weight.dtype)
        return grad_x, grad_w, None, None, None


# ---------------------------------------------------------------------- the variant
class VeloraVariant(LoraVariant):
    """VeLoRA for one adapter of one linear layer (see the module doc)."""

    name = "VeLoRA"
    plain_merge = True  # as plain LoRA: W += ΔW (and the LoRA bias)

    def __init__(self, config: VeloraConfig) -> None:
        self.num_groups, self.scale, self.init_type = config.num_groups, float(config.scale), config.init_type
        #: whether the projection is final (``"random"``, or ``"batch_average_once"`` after its first batch)
        self.initialized = config.init_type == "random"

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Create ``lora_velora_embed[adapter_name]: (D,)`` in the adapter's dtype (on meta for a load's
        probe): a normalised ``randn`` for ``"random"``, zeros until the first training batch otherwise."""
        if EMBED not in layer._modules:
            layer._modules[EMBED] = BufferDict()
            layer.adapter_layer_names = (*layer.adapter_layer_names, EMBED)  # saved and deleted with A / B
        weight = layer.get_base_layer().weight
        dtype = layer.lora_A[adapter_name].weight.dtype  # the adapter's dtype (float32 under autocast_adapter_dtype)
        device = torch.device("meta") if is_probing() else weight.device
        D = group_dim(layer.in_features, self.num_groups)
        if device.type == "meta" or self.init_type != "random":
            embed = torch.zeros(D, device=device)
        else:
            embed = unit(torch.randn(D, device=device))
        layer._modules[EMBED][adapter_name] = embed.to(dtype)

    def _update_embed(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor) -> None:
        """``batch_average(_once)``: the projection becomes the normalised mean sub-token of ``x: (..., in)``."""
        if self.initialized:
            return
        holder = layer._modules[EMBED]
        with torch.no_grad():
            target = holder[adapter_name]
            mean = sub_tokens(x.detach(), self.num_groups).reshape(-1, target.shape[0]).mean(dim=0)
            holder[adapter_name] = unit(mean).to(device=target.device, dtype=target.dtype)
        self.initialized = self.init_type == "batch_average_once"

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in)``, ``result: (..., out)``: ``result + scaling * B(A(dropout(x)))`` out of place; while
        training with autograd, ``A`` runs through :class:`VeloraLinearFn`."""
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.lora_dropout[adapter_name](layer._cast_input_dtype(x, lora_A.weight.dtype))
        if layer.training and torch.is_grad_enabled():
            self._update_embed(layer, adapter_name, x)
            embed = layer._modules[EMBED][adapter_name].detach()
            hidden = VeloraLinearFn.apply(x, lora_A.weight, embed, self.num_groups, self.scale)
        else:
            hidden = lora_A(x)
        return (result + lora_B(hidden) * layer.scaling[adapter_name]).to(result.dtype)


def velora_variant(layer: LoraLayer, value: VeloraConfig) -> LoraVariant:
    """The factory of ``VARIANT_FIELDS["velora_config"]``: VeLoRA adapts ``nn.Linear`` / GPT-2 ``Conv1D`` layers
    (not quantized, embedding, convolution or attention layers, as the reference); :class:`ConfigError` otherwise."""
    from .layers import Linear
    from .quantized import QuantLinear

    if type(layer) is not Linear or isinstance(layer, QuantLinear):
        kind = type(layer.get_base_layer()).__name__
        raise ConfigError("velora_config", value, f"VeLoRA adapts nn.Linear layers only (as the reference); a target "
                          f"is a {kind}. Exclude it from target_modules or set velora_config=None")
    return VeloraVariant(value)
