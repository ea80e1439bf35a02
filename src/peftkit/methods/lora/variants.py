"""LoRA variants: one object per adapter per layer, chosen once when the adapter is created.

Plain LoRA has no variant. A variant (DoRA here; aLoRA, QALoRA, ... in the reference) changes what the layer does
for its adapter at a few fixed points, the reference's ``LoraVariant`` protocol
(``peft/tuners/lora/variants.py``):

* :meth:`LoraVariant.init` after ``lora_A`` / ``lora_B`` exist (DoRA: the magnitude from ``‖W + ΔW‖``);
* :meth:`LoraVariant.forward` computes the adapter's contribution to the layer output;
* :meth:`LoraVariant.merge` / :meth:`LoraVariant.unmerge` write the adapter into / out of the base weight.

The layer keeps them in ``layer._variants: dict[adapter_name, LoraVariant]``. Its fast paths (the no-grad plan,
the cached ``scaling * B.T``, the fused training node, in-place updates of the base output) serve only adapters
without a variant: an adapter with one always runs through :meth:`LoraVariant.forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ...errors import ConfigError, MergeError
from .dora import view_norm

if TYPE_CHECKING:
    from .layers import LoraLayer


class LoraVariant:
    """What a variant changes for one adapter of one layer. Subclasses override what they change."""

    #: the variant's name in messages (``"DoRA"``)
    name: str = "variant"
    #: whether :meth:`init` must run (and the adapter's tensors be allocated) even when a checkpoint will overwrite
    #: the adapter's weights, e.g. because it reads the base weight (DoRA's magnitude)
    init_allocates: bool = False
    #: whether :meth:`merge` can write the adapter into the base weight; when False, merging refuses before any
    #: layer changes (:meth:`refuse_merge`)
    mergeable: bool = True
    #: whether the adapter merges as plain LoRA (``W += ΔW`` from the layer's ``get_delta_weight``, and the LoRA
    #: bias): the layer then merges and unmerges it itself and :meth:`merge` / :meth:`unmerge` are not called
    plain_merge: bool = False

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Create the variant's own state on ``layer`` once ``lora_A`` / ``lora_B`` exist."""

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``result`` (``(..., out)``, or ``(N, out, *spatial)`` for convolutions) plus this adapter's contribution,
        for the layer input ``x``; ``base_out`` is the base layer's output before any adapter. Out of place unless
        the variant knows ``result`` may be written."""
        raise NotImplementedError

    def merge(self, layer: LoraLayer, adapter_name: str, safe_merge: bool) -> None:
        """Write the adapter into the base weight (the layer records it in ``merged_adapters``)."""
        raise MergeError(f"{self.name} adapters cannot be merged (adapter {adapter_name!r})")

    def unmerge(self, layer: LoraLayer, adapter_name: str) -> None:
        """Undo :meth:`merge`."""
        raise MergeError(f"{self.name} adapters cannot be unmerged (adapter {adapter_name!r})")

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor | None:
        """The adapter's dense update (the layer's ``get_delta_weight`` layout and dtype) when it is not the plain
        ``scaling * B @ A`` (KaSA: ``lora_diag`` sits between the factors); None for the plain one."""
        return None

    def combine_source(self, layer: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor,
                       rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` (``A: (r, in)``, ``B: (out, r)``, detached copies) folded so that ``scaling * B @ A`` is this
        adapter's update, for ``add_weighted_adapter`` combining into a new adapter of rank ``rank``; raises
        :class:`ConfigError` before anything changes when the variant cannot be combined so. Default: unchanged."""
        return A, B

    def init_combined(self, layer: LoraLayer, adapter_name: str) -> None:
        """After ``add_weighted_adapter`` wrote the factors of ``adapter_name`` (a new adapter with this variant):
        make the variant's own state neutral, so the update is ``scaling * B @ A``."""

    def refuse_merge(self, layer: LoraLayer, adapter_name: str) -> None:
        """Raise what :meth:`merge` would raise, without changing anything, when the variant cannot merge."""
        if not self.mergeable:
            self.merge(layer, adapter_name, False)


class DoraVariant(LoraVariant):
    """DoRA (``use_dora=True``): see :mod:`.dora`. The layer supplies the layout (``_dora_view``, ``_dora_delta``,
    ``_dora_factor``) and its kind's forward (``_dora_forward``)."""

    name = "DoRA"
    init_allocates = True

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        layer._create_dora(adapter_name)

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return layer._dora_forward(adapter_name, x, result, base_out)

    def merge(self, layer: LoraLayer, adapter_name: str, safe_merge: bool) -> None:
        """``V <- (m / ‖V + ΔV‖) * (V + ΔV)`` in the norm view; the norm is kept for :meth:`unmerge`."""
        base = layer.get_base_layer()
        view = layer._dora_view(base.weight).detach()
        delta = layer._dora_delta(adapter_name, view).to(view.dtype)
        norm = view_norm(view, delta)
        new = layer._dora_factor(adapter_name, norm, view) * (view + delta)
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        with torch.no_grad():
            base.weight.data.copy_(layer._dora_view(new))
        layer._dora_merged_norm[adapter_name] = norm

    def unmerge(self, layer: LoraLayer, adapter_name: str) -> None:
        """``V <- V / factor - ΔV`` with the norm recorded at merge time."""
        base = layer.get_base_layer()
        view = layer._dora_view(base.weight).detach()
        delta = layer._dora_delta(adapter_name, view).to(view.dtype)
        old = view / layer._dora_factor(adapter_name, layer._dora_merged_norm.pop(adapter_name), view) - delta
        with torch.no_grad():
            base.weight.data.copy_(layer._dora_view(old))


#: the config fields that select a variant, each with its factory ``(layer, value) -> LoraVariant`` (a falsy value
#: selects nothing). A new variant adds its entry here (the layer code never names a variant).
VARIANT_FIELDS: dict[str, Callable[[LoraLayer, Any], LoraVariant]] = {}


def variant_for(layer: LoraLayer, **options: Any) -> LoraVariant | None:
    """The variant of a new adapter of ``layer`` from its update options (the config fields of
    :data:`VARIANT_FIELDS`; other options are ignored), or None for plain LoRA. Raises :class:`ConfigError`
    (``ValueError``, as the reference) for a combination of variants or a layer kind the variant does not support."""
    requested = [name for name in VARIANT_FIELDS if options.get(name)]
    if len(requested) > 1:
        raise ConfigError(requested[0], options[requested[0]],
                          f"the LoRA variants {requested} cannot be combined; choose one")
    return VARIANT_FIELDS[requested[0]](layer, options[requested[0]]) if requested else None


def _alora_variant(layer: LoraLayer, tokens: list[int]) -> LoraVariant:
    from .alora import ALoraVariant
    from .layers import Linear

    if not isinstance(layer, Linear):
        kind = type(layer.get_base_layer()).__name__
        raise ConfigError("alora_invocation_tokens", tokens, f"aLoRA adapts linear layers only (as the reference); "
                          f"a target is a {kind} ({type(layer).__name__}). Exclude it from target_modules or set "
                          "alora_invocation_tokens=None")
    return ALoraVariant()


def _lazy(module: str, name: str) -> Any:
    """``name`` from the sibling module ``module``, imported on first use (variant modules import this one)."""
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _arrow_variant(layer: LoraLayer, config: Any) -> LoraVariant:
    from .arrow import arrow_variant

    return arrow_variant(layer, config)


def _bdlora_variant(layer: LoraLayer, value: Any) -> LoraVariant:
    from .bdlora import bdlora_variant  # imported late: bdlora imports this module

    return bdlora_variant(layer, value)


VARIANT_FIELDS.update({
    "use_dora": lambda layer, value: DoraVariant(),
    "alora_invocation_tokens": _alora_variant,
    "use_bdlora": _bdlora_variant,
    "arrow_config": _arrow_variant,
    "monteclora_config": lambda layer, value: _lazy("monteclora", "monteclora_variant")(layer, value),
    "kasa_config": lambda layer, value: _lazy("kasa", "kasa_variant")(layer, value),
    "velora_config": lambda layer, value: _lazy("velora", "velora_variant")(layer, value),
})
