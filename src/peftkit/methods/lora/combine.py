"""``add_weighted_adapter`` for LoRA: a new adapter made from a weighted combination of existing ones.

Three families of combination types (a table below maps each of the eleven names to one):

- ``cat``: concatenate ``A_i`` scaled by ``w_i * scaling_i`` and ``B_i``; rank = sum of ranks. Exact:
  ``ΔW_new = sum_i w_i ΔW_i``.
- factors (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): merge the ``A_i`` with
  coefficients ``sign(c_i) sqrt(|c_i|)`` and the ``B_i`` with ``sqrt(|c_i|)``, ``c_i = w_i * scaling_i``; needs equal
  ranks. An approximation (``B_new A_new`` has cross terms), as in the reference.
- svd (``svd``, ``ties_svd``, ``dare_*_svd``, ``magnitude_prune_svd``): merge the dense ``ΔW_i`` with the weights, then
  keep the best rank-``svd_rank or max(r)`` factorisation.

The new adapter's config is the first source's with ``r = lora_alpha = new rank`` (scaling 1), no rank/alpha
patterns and ``use_rslora=False``. The reference inherits ``use_rslora``, which scales its result by
``sqrt(new rank)``; peftkit does not. Deliberate differences besides: ``modules_to_save`` is the union of the
sources' and the new adapter's copy of such a module starts from the (single) source copy instead of the original
module; a LoRA bias (``lora_bias``) is combined as ``sum_i w_i scaling_i b_i``; ranks smaller than the new rank in
some layers (``rank_pattern``) are zero-padded instead of failing.

Every combined tensor is computed before the new adapter is injected, so a failure leaves the model unchanged and
the random pruning of ``dare_*`` reads the global RNG from the start of the call, drawing (in module order, ``A``
masks before ``B`` masks) what the reference draws after its injection.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ...config import PeftConfig, is_int, is_number
from ...errors import ConfigError, MergeError
from ...injection.plan import InjectionPlan
from ...layers.modules_to_save import ModulesToSaveWrapper
from ...ops.merge import RECIPES, SIGN_METHODS, MergeRecipe, merge_tensors, truncated_svd_factors
from .config import LoraConfig
from .layers import Embedding, LoraLayer


class _Tuner(Protocol):
    """What this module needs from the tuner (``TunerModel``)."""

    peft_config: dict[str, PeftConfig]

    def adapter_modules(self) -> Any: ...

    def plan(self, config: PeftConfig, adapter_name: str) -> InjectionPlan: ...

    def inject_adapter(self, config: PeftConfig, adapter_name: str) -> Any: ...


@dataclass(frozen=True)
class _Source:
    """One source adapter in one layer: ``A: (r, in, *k)``, ``B: (out, r, *1)`` (linear/conv; embeddings:
    ``A: (r, num_embeddings)``, ``B: (dim, r)``), in a float32-or-wider working dtype."""

    weight: float
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None

    @property
    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` as ``(out, in * prod(k))``."""
        return (self.B.reshape(self.B.shape[0], -1) @ self.A.reshape(self.A.shape[0], -1)) * self.scaling


@dataclass(frozen=True)
class _Options:
    """The user's options that the per-layer functions read."""

    recipe: MergeRecipe | None
    density: float | None
    majority_sign_method: str
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None


# ---------------------------------------------------------------------------------------------- per-layer families
def _new_shapes(src: _Source, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the new ``A`` and ``B`` at rank ``rank`` (same kernel/embedding layout as the sources)."""
    return (rank, *src.A.shape[1:]), (src.B.shape[0], rank, *src.B.shape[2:])


def _combine_cat(sources: list[_Source], rank: int, layer: LoraLayer, opts: _Options) -> tuple[torch.Tensor, ...]:
    """Stack ``w_i scaling_i A_i`` (rows) and ``B_i`` (columns); rows beyond the layer's ranks stay zero."""
    shape_A, shape_B = _new_shapes(sources[0], rank)
    A, B = sources[0].A.new_zeros(shape_A), sources[0].B.new_zeros(shape_B)
    row = 0
    for src in sources:
        r = src.A.shape[0]
        A[row:row + r] = src.A * (src.weight * src.scaling)
        B[:, row:row + r] = src.B
        row += r
    return A, B


def _pad_rank(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad ``tensor`` along ``dim`` to size ``rank`` (a smaller rank from ``rank_pattern``)."""
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def _combine_factors(sources: list[_Source], rank: int, layer: LoraLayer, opts: _Options) -> tuple[torch.Tensor, ...]:
    """Merge the ``A_i`` with ``sign(c_i) sqrt|c_i|`` and the ``B_i`` with ``sqrt|c_i|``, ``c_i = w_i scaling_i``."""
    assert opts.recipe is not None
    coeffs = [src.weight * src.scaling for src in sources]
    roots = [math.sqrt(abs(c)) for c in coeffs]
    weights_A = torch.tensor([math.copysign(root, c) for root, c in zip(roots, coeffs)], dtype=torch.float64)
    weights_B = torch.tensor(roots, dtype=torch.float64)
    merge = (lambda tensors, weights: merge_tensors(tensors, weights.to(tensors[0].device), opts.recipe,
                                                    opts.density, opts.majority_sign_method))
    A = merge([_pad_rank(src.A, rank, 0) for src in sources], weights_A)
    B = merge([_pad_rank(src.B, rank, 1) for src in sources], weights_B)
    return A, B


def _combine_svd(sources: list[_Source], rank: int, layer: LoraLayer, opts: _Options) -> tuple[torch.Tensor, ...]:
    """Merge the dense ``ΔW_i`` with ``w_i``, then factor the result by a truncated SVD."""
    assert opts.recipe is not None
    # the reference merges ΔW in the layout of get_delta_weight: (in, out) for Conv1D and embeddings (same RNG use)
    transposed = layer.fan_in_fan_out or isinstance(layer, Embedding)
    deltas = [src.delta.t() if transposed else src.delta for src in sources]
    weights = torch.tensor([src.weight for src in sources], dtype=torch.float64, device=deltas[0].device)
    merged = merge_tensors(deltas, weights, opts.recipe, opts.density, opts.majority_sign_method)
    merged = merged.t() if transposed else merged
    B, A = truncated_svd_factors(merged, rank, opts.svd_clamp, opts.svd_full_matrices, opts.svd_driver)
    shape_A, shape_B = _new_shapes(sources[0], rank)
    return A.reshape(shape_A), B.reshape(shape_B)


def _rank_equal(ranks: dict[str, int], combination_type: str, svd_rank: int | None) -> int:
    if len(set(ranks.values())) != 1:
        raise ConfigError(
            "combination_type", combination_type,
            f"it needs adapters of equal rank r, got ranks {ranks}; use 'cat' or an svd type "
            f"({sorted(t for t in COMBINATIONS if t.endswith('svd'))}) for different ranks",
        )
    return next(iter(ranks.values()))


def _rank_sum(ranks: dict[str, int], combination_type: str, svd_rank: int | None) -> int:
    return sum(ranks.values())


def _rank_svd(ranks: dict[str, int], combination_type: str, svd_rank: int | None) -> int:
    return svd_rank or max(ranks.values())


_LayerFn = Callable[[list[_Source], int, LoraLayer, _Options], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Combination:
    """One combination type: how the new rank follows from the sources' ranks, and how one layer is combined."""

    new_rank: Callable[[dict[str, int], str, int | None], int]
    combine_layer: _LayerFn
    recipe: MergeRecipe | None = None

    @property
    def needs_density(self) -> bool:
        return self.recipe is not None and self.recipe.needs_density


def _factors(recipe: str) -> Combination:
    return Combination(_rank_equal, _combine_factors, RECIPES[recipe])


def _svd(recipe: str) -> Combination:
    return Combination(_rank_svd, _combine_svd, RECIPES[recipe])


#: the eleven combination types of the reference
COMBINATIONS: dict[str, Combination] = {
    "svd": _svd("linear"),
    "linear": _factors("linear"),
    "cat": Combination(_rank_sum, _combine_cat),
    "ties": _factors("ties"),
    "ties_svd": _svd("ties"),
    "dare_ties": _factors("dare_ties"),
    "dare_linear": _factors("dare_linear"),
    "dare_ties_svd": _svd("dare_ties"),
    "dare_linear_svd": _svd("dare_linear"),
    "magnitude_prune": _factors("magnitude_prune"),
    "magnitude_prune_svd": _svd("magnitude_prune"),
}


# ---------------------------------------------------------------------------------------------- validation
def _check_options(combination_type: str, svd_rank: int | None, svd_clamp: float | None, density: float | None,
                   majority_sign_method: str) -> Combination:
    if combination_type not in COMBINATIONS:
        raise ConfigError("combination_type", combination_type, f"allowed: {list(COMBINATIONS)}")
    combination = COMBINATIONS[combination_type]
    if combination.needs_density and not (is_number(density) and 0 < density <= 1):  # type: ignore[operator]
        raise ConfigError("density", density,
                          f"combination_type={combination_type!r} needs a density with 0 < density <= 1")
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError("majority_sign_method", majority_sign_method, f"allowed: {list(SIGN_METHODS)}")
    if svd_rank is not None and not (is_int(svd_rank) and svd_rank >= 1):
        raise ConfigError("svd_rank", svd_rank, "allowed: None or an int >= 1")
    if svd_clamp is not None and not (is_number(svd_clamp) and 0 <= svd_clamp <= 1):
        raise ConfigError("svd_clamp", svd_clamp, "allowed: None or a quantile with 0 <= svd_clamp <= 1")
    return combination


def _check_modules_to_save(wrappers: list[tuple[str, ModulesToSaveWrapper]], adapters: Sequence[str]) -> None:
    for name, wrapper in wrappers:
        holders = [a for a in adapters if wrapper.has_adapter(a)]
        if len(holders) > 1:
            raise MergeError(
                f"adapters {holders} each have their own copy of the modules_to_save module {name!r}; full copies "
                "cannot be combined, so combine adapters of which at most one trains that module"
            )


# ---------------------------------------------------------------------------------------------- gathering
def _factors_of(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` of ``adapter`` in ``layer`` (linear/conv modules or embedding parameters), None when absent."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _work(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy in float32 or wider (half-precision adapters are combined in float32)."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def _sources(layer: LoraLayer, adapters: Sequence[str], weights: Sequence[float], rank: int) -> list[_Source]:
    """The sources present in ``layer``, in the caller's order (absent adapters contribute nothing); a variant folds
    its own state into the factors (:meth:`.variants.LoraVariant.combine_source`, KaSA's ``lora_diag``)."""
    found = []
    for adapter, weight in zip(adapters, weights):
        factors = _factors_of(layer, adapter)
        if factors is None:
            continue
        A, B = _work(factors[0]), _work(factors[1])
        variant = layer._variants.get(adapter)
        if variant is not None:
            A, B = variant.combine_source(layer, adapter, A, B, rank)
        bias = layer.lora_B[adapter].bias if adapter in layer.lora_B else None
        found.append(_Source(float(weight), A, B, float(layer.scaling[adapter]), None if bias is None else _work(bias)))
    return found


def _source_layers(tuner: _Tuner, adapters: Sequence[str]) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every LoRA layer holding at least one of ``adapters``, in module order."""
    return [(name, module) for name, module in tuner.adapter_modules()
            if isinstance(module, LoraLayer) and any(_factors_of(module, a) is not None for a in adapters)]


def _source_ranks(layers: list[tuple[str, LoraLayer]], adapters: Sequence[str]) -> dict[str, int]:
    """The largest rank of each adapter over the layers that hold it."""
    return {a: max(layer.r[a] for _, layer in layers if a in layer.r) for a in adapters}


def _combined_bias(sources: list[_Source]) -> torch.Tensor | None:
    """``sum_i w_i scaling_i b_i`` over the sources with a LoRA bias, or None when none has one."""
    biased = [src for src in sources if src.bias is not None]
    if not biased:
        return None
    return torch.stack([src.bias * (src.weight * src.scaling) for src in biased]).sum(dim=0)  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------- the new config
def _union_targets(configs: list[LoraConfig]) -> set[str] | str | None:
    """The reference's union of ``target_modules``: set union, or the regexes joined; None for a mix."""
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)  # type: ignore[str-bytes-safe]
    if all(isinstance(t, (set, list, tuple)) for t in targets):
        return set().union(*targets)  # type: ignore[arg-type]
    return None


def _target_forms(configs: list[LoraConfig], names: list[str]) -> list[dict[str, Any]]:
    """Candidate targeting fields: the reference's union first (readable), then the exact module names."""
    forms = []
    union = _union_targets(configs)
    if union is not None and not (isinstance(union, str) and configs[0].layers_to_transform is not None):
        forms.append({"target_modules": union})
    exact = "|".join(re.escape(n) for n in names)
    forms.append({"target_modules": exact, "exclude_modules": None, "layers_to_transform": None,
                  "layers_pattern": None})
    return forms


def _new_config(tuner: _Tuner, adapters: Sequence[str], adapter_name: str, rank: int,
                layers: list[tuple[str, LoraLayer]]) -> LoraConfig:
    """The new adapter's config; its targets select exactly the layers holding a source (or MergeError)."""
    configs: list[LoraConfig] = [tuner.peft_config[a] for a in adapters]  # type: ignore[misc]
    saved = list(dict.fromkeys(m for c in configs for m in (c.modules_to_save or [])))
    common = {"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "modules_to_save": saved or None, "bias": "none",
              "lora_bias": any(c.lora_bias for c in configs)}
    names = [name for name, _ in layers]
    for form in _target_forms(configs, names):
        config = configs[0].copy(**common, **form)
        if sorted(lp.name for lp in tuner.plan(config, adapter_name).layers) == sorted(names):
            return config
    raise MergeError(f"no config of the combined adapter targets exactly the layers of {list(adapters)} ({names}); "
                     "some lie inside a modules_to_save module of another source")


# ---------------------------------------------------------------------------------------------- writing
def _write_layer(layer: LoraLayer, adapter_name: str, tensors: tuple[torch.Tensor | None, ...]) -> None:
    A, B, bias = tensors
    target_A, target_B = _factors_of(layer, adapter_name)  # type: ignore[misc]
    with torch.no_grad():
        target_A.copy_(A)
        target_B.copy_(B)
        target_bias = layer.lora_B[adapter_name].bias if adapter_name in layer.lora_B else None
        if target_bias is not None and bias is not None:
            target_bias.copy_(bias)
        elif target_bias is not None:
            target_bias.zero_()
    variant = layer._variants.get(adapter_name)
    if variant is not None:
        variant.init_combined(layer, adapter_name)


def _copy_modules_to_save(wrappers: list[tuple[str, ModulesToSaveWrapper]], adapters: Sequence[str],
                          adapter_name: str) -> None:
    """The new adapter's copy of a ``modules_to_save`` module starts from the one source copy, if any."""
    for _, wrapper in wrappers:
        holders = [a for a in adapters if wrapper.has_adapter(a)]
        if holders and wrapper.has_adapter(adapter_name):
            with torch.no_grad():
                state = wrapper.modules_to_save[holders[0]].state_dict()
                wrapper.modules_to_save[adapter_name].load_state_dict(state)


# ---------------------------------------------------------------------------------------------- entry point
def add_weighted_adapter(
    tuner: _Tuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (see the module docstring).

    The caller (``TunerModel.add_weighted_adapter``) has checked the names, the weights' length and the peft types.
    A single source is always combined ``linear``-ly, as in the reference. The new adapter is added inactive.
    """
    combination = _check_options(combination_type, svd_rank, svd_clamp, density, majority_sign_method)
    bd = [a for a in adapters if getattr(tuner.peft_config[a], "use_bdlora", None)]
    if bd:  # block-diagonal factors cannot hold a combined (dense) update
        raise ConfigError("use_bdlora", tuner.peft_config[bd[0]].use_bdlora,
                          f"add_weighted_adapter cannot combine BD-LoRA adapters {bd}; use merge_and_unload instead")
    if len(adapters) == 1:
        combination_type, combination = "linear", COMBINATIONS["linear"]
    wrappers = [(n, m) for n, m in tuner.adapter_modules() if isinstance(m, ModulesToSaveWrapper)]
    _check_modules_to_save(wrappers, adapters)
    layers = _source_layers(tuner, adapters)
    rank = combination.new_rank(_source_ranks(layers, adapters), combination_type, svd_rank)
    opts = _Options(combination.recipe, density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
    combined = {}
    for name, layer in layers:
        sources = _sources(layer, adapters, weights, rank)
        combined[name] = (*combination.combine_layer(sources, rank, layer, opts), _combined_bias(sources))
    config = _new_config(tuner, adapters, adapter_name, rank, layers)
    tuner.inject_adapter(config, adapter_name)
    for name, layer in layers:
        _write_layer(layer, adapter_name, combined[name])
    _copy_modules_to_save(wrappers, adapters, adapter_name)
