"""Arrow (``LoraConfig.arrow_config``, :func:`create_arrow_model`): per-token routing among a library of task LoRAs.

:func:`create_arrow_model` loads ``E`` task LoRAs (trained elsewhere, same rank and targets) into one model as
adapters ``task_0 .. task_{E-1}``, optionally ``G`` general-knowledge LoRAs as ``gks_0 .. gks_{G-1}``, and adds a
*router* adapter ``arrow_router`` (a LoRA of the same rank and targets whose config carries the
:class:`ArrowConfig`), which it activates. On each targeted linear layer the router's :class:`ArrowVariant` then
computes, for ``x: (..., in)``,

    y = base(x) + dropout_router(Σ_e coeff_e(x) · scaling_e · B_e A_e x)

with the coefficients of :func:`peftkit.ops.arrow.arrow_coefficients` (softmax over the ``top_k`` experts whose
prototype, the top right singular vector of ``B_e A_e``, is most aligned with the token). The router's own
``lora_A`` / ``lora_B`` are created (and saved) but never used, as in the reference.

Lazily, at the router's first forward on a layer (as the reference's ``ArrowLinearVariant.forward``):

1. **GenKnowSub** (``use_gks=True``, https://aclanthology.org/2025.acl-short.54/): the mean ``A`` and the mean ``B``
   of the general adapters are subtracted *in place* from every task adapter's ``A`` and ``B`` (so saving the task
   adapters afterwards saves the subtracted weights, and activating a task adapter alone uses them);
2. the prototypes are computed once (:func:`peftkit.ops.arrow.top_right_singular_vector`) and cached.

Task adapters added to the model later (``load_adapter`` with any name but ``gks_<n>``) join the experts at the next
forward: the prototypes are recomputed and, with GenKnowSub already done, only the new experts are subtracted from
(the reference's ``on_adapter_change``). Arrow cannot be merged (the update depends on each token): merging with the
router active raises :class:`ArrowMergeError` (a ``RuntimeError``, as the reference).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...config import check, is_int, is_number
from ...errors import ConfigError, ConfigTypeError, MergeError
from ...ops.arrow import arrow_coefficients, arrow_delta, top_right_singular_vector
from .variants import LoraVariant

if TYPE_CHECKING:
    from .layers import LoraLayer

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"
ROUTER_ADAPTER_NAME = "arrow_router"


@dataclass
class ArrowConfig:
    """Arrow's options (the reference's ``ArrowConfig``), the value of ``LoraConfig.arrow_config``.

    Args:
        top_k: experts combined per token (``1 <= top_k <= E``).
        router_temperature: softmax temperature of the routing weights (``> 0``).
        use_gks: apply GenKnowSub (subtract the mean general-knowledge LoRA from every task LoRA).
        rng_seed: seed of the power iteration's start vector; None draws it from the global RNG.

    ``task_adapter_names`` / ``gks_adapter_names`` are set by :func:`create_arrow_model` (not constructor arguments,
    as the reference); they are saved in the router's ``adapter_config.json``.
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: list[str] | None = field(default=None, init=False)
    gks_adapter_names: list[str] | None = field(default=None, init=False)
    rng_seed: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.top_k):
            raise ConfigTypeError("top_k", self.top_k, "allowed: an int >= 1")
        check(self.top_k >= 1, "top_k", self.top_k, "allowed: an int >= 1")
        if not is_number(self.router_temperature):
            raise ConfigTypeError("router_temperature", self.router_temperature, "allowed: a number > 0")
        check(self.router_temperature > 0, "router_temperature", self.router_temperature, "allowed: a number > 0")
        check(isinstance(self.use_gks, bool), "use_gks", self.use_gks, "allowed: True or False")
        if self.rng_seed is not None and not is_int(self.rng_seed):
            raise ConfigTypeError("rng_seed", self.rng_seed, "allowed: None or an int")


def as_arrow_config(value: object) -> ArrowConfig | None:
    """``LoraConfig.arrow_config`` as an :class:`ArrowConfig`: a dict (a loaded ``adapter_config.json``) is converted,
    keeping its saved ``task_adapter_names`` / ``gks_adapter_names``; None and instances pass through.

    Raises:
        ConfigError: the dict has keys that are not fields of :class:`ArrowConfig`.
        ConfigTypeError: any other type.
    """
    if value is None or isinstance(value, ArrowConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigTypeError("arrow_config", value, "allowed: None, an ArrowConfig or a dict of its fields")
    fields = {f.name: f for f in dataclasses.fields(ArrowConfig)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError("arrow_config", value, f"unknown keys {unknown}; allowed: {sorted(fields)}")
    config = ArrowConfig(**{k: v for k, v in value.items() if fields[k].init})
    for name in ("task_adapter_names", "gks_adapter_names"):
        if value.get(name) is not None:
            setattr(config, name, list(value[name]))
    return config


class ArrowMergeError(MergeError, RuntimeError):
    """The Arrow router cannot be merged: each token mixes other experts (the reference raises ``RuntimeError``)."""


def _is_gks_name(name: str) -> bool:
    return name.startswith(GKS_ADAPTER_PREFIX) and name[len(GKS_ADAPTER_PREFIX):].isdigit()


class ArrowVariant(LoraVariant):
    """The router adapter of one linear layer: routes each token among the layer's task adapters (see the module
    doc). Holds the expert names, the GenKnowSub state and the cached prototypes ``(E, in)``."""

    name = "Arrow"
    mergeable = False

    def __init__(self, config: ArrowConfig) -> None:
        self.config = config
        self.task_names: list[str] = list(config.task_adapter_names or [])
        self.gks_names: list[str] = list(config.gks_adapter_names or [])
        self.gks_done = False
        self.gks_added: list[str] = []
        self.prototypes: torch.Tensor | None = None

    # ------------------------------------------------------------------ lazy state
    def _sync_experts(self, layer: LoraLayer) -> None:
        """Follow adapters added to (or removed from) the layer since the last forward: every adapter with both
        ``lora_A`` and ``lora_B`` that is neither a router nor ``gks_<n>`` is an expert (the reference's
        ``on_adapter_change``)."""
        routers = {n for n, v in layer._variants.items() if isinstance(v, ArrowVariant)}
        current = [n for n in layer.lora_A if n in layer.lora_B and n not in routers and not _is_gks_name(n)]
        if sorted(current) == sorted(self.task_names):
            return
        if len(self.task_names) < len(current):
            self.gks_added = [n for n in current if n not in self.task_names]
        self.task_names = current
        self.prototypes = None

    @torch.no_grad()
    def _gen_know_sub(self, layer: LoraLayer) -> None:
        """GenKnowSub, once (then only for experts added later): ``A_e -= mean_g A_g``, ``B_e -= mean_g B_g``."""
        if not self.config.use_gks or (self.gks_done and not self.gks_added):
            return
        avg_A = torch.stack([layer.lora_A[n].weight for n in self.gks_names]).mean(0)  # (r, in)
        avg_B = torch.stack([layer.lora_B[n].weight for n in self.gks_names]).mean(0)  # (out, r)
        for name in (self.gks_added if self.gks_done else self.task_names):
            layer.lora_A[name].weight.data.sub_(avg_A)
            layer.lora_B[name].weight.data.sub_(avg_B)
        self.gks_done = True
        self.gks_added = []

    @torch.no_grad()
    def _prototypes(self, layer: LoraLayer) -> torch.Tensor:
        """``(E, in)`` prototypes in the experts' dtype, computed once per set of experts."""
        if self.prototypes is None:
            protos = []
            for name in self.task_names:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                protos.append(top_right_singular_vector(A, B, self.config.rng_seed).to(A.dtype))
            self.prototypes = torch.stack(protos)
        return self.prototypes

    # ------------------------------------------------------------------ LoraVariant
    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in)``, ``result: (..., out)``: ``result`` plus the routed update (out of place)."""
        self._sync_experts(layer)
        if not self.task_names:
            raise ConfigError("arrow_config", self.config, "the Arrow router needs at least one task adapter on "
                              "the layer; build the model with create_arrow_model")
        self._gen_know_sub(layer)
        protos = self._prototypes(layer)
        A_stack = torch.stack([layer.lora_A[n].weight for n in self.task_names])  # (E, r, in)
        B_stack = torch.stack([layer.lora_B[n].weight for n in self.task_names])  # (E, out, r)
        x = x if x.dtype == A_stack.dtype else x.to(A_stack.dtype)  # the reference always casts here
        tokens = x.reshape(-1, x.shape[-1])  # (t, in)
        scales = torch.tensor([layer.scaling[n] for n in self.task_names], device=tokens.device, dtype=tokens.dtype)
        coeff = arrow_coefficients(tokens, protos.to(tokens.device), self.config.top_k,
                                   self.config.router_temperature)
        delta = layer.lora_dropout[adapter_name](arrow_delta(tokens, coeff, A_stack, B_stack, scales))
        # the sum in the promoted dtype, then back to the base output's (the reference casts after its loop)
        return (result + delta.view(*x.shape[:-1], delta.shape[-1])).to(result.dtype)

    def merge(self, layer: LoraLayer, adapter_name: str, safe_merge: bool) -> None:
        raise ArrowMergeError(f"Cannot merge an active Arrow router adapter ({adapter_name!r}): its update is "
                              "routed per token. Remove it first (delete_adapter) or use another adapter.")

    def unmerge(self, layer: LoraLayer, adapter_name: str) -> None:
        raise ArrowMergeError(f"Cannot unmerge an active Arrow router adapter ({adapter_name!r}).")


def arrow_variant(layer: LoraLayer, config: ArrowConfig) -> LoraVariant:
    """The factory of ``VARIANT_FIELDS["arrow_config"]``: linear layers only, with the experts named."""
    from .layers import Linear

    if not isinstance(layer, Linear):
        kind = type(layer.get_base_layer()).__name__
        raise ConfigTypeError("arrow_config", config, f"Arrow routes LoRAs of linear layers only (as the "
                              f"reference); a target is a {kind}. Exclude it from target_modules")
    if config.task_adapter_names is None:
        raise ConfigError("arrow_config", config, "task_adapter_names is not set; build Arrow models with "
                          "create_arrow_model(base_model, task_specific_adapter_paths, arrow_config)")
    return ArrowVariant(config)


# ---------------------------------------------------------------------- create_arrow_model
def _resolve_adapter_source(path: str) -> tuple[str, str | None]:
    """``(model_id, subfolder)`` for a local adapter folder or a Hub path ``user/repo[/sub/folder]`` (as the
    reference). Raises :class:`ConfigError` for a local folder without ``adapter_config.json``."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ConfigError("task_specific_adapter_paths", path, "a local adapter folder must contain "
                              "adapter_config.json")
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return ("/".join(parts) if len(parts) == 2 else path), None


def _load(model: Any, path: str, adapter_name: str, kwargs: dict[str, Any], first: bool) -> Any:
    """Load the adapter at ``path`` as ``adapter_name`` (into a new PeftModel when ``first``)."""
    from ...peft_model import PeftModel

    model_id, sub = _resolve_adapter_source(path)
    kw = dict(kwargs)
    if sub is not None and "subfolder" not in kw:
        kw["subfolder"] = sub
    if first:
        return PeftModel.from_pretrained(model, model_id=model_id, adapter_name=adapter_name, **kw)
    model.load_adapter(model_id=model_id, adapter_name=adapter_name, **kw)
    return model


def _check_compatible(model: nn.Module, task_names: Sequence[str], gks_names: Sequence[str]) -> tuple[list[str], int]:
    """All adapters must have the same rank, shapes and targeted module names (the reference's
    ``check_loaded_lora_compatibility_arrow``) and target linear layers only. Returns ``(module names, r)``."""
    from .layers import Linear, LoraLayer

    reference: tuple[int, tuple[Any, ...], set[str]] | None = None
    for name in [*task_names, *gks_names]:
        field_name = "general_adapter_paths" if name in gks_names else "task_specific_adapter_paths"
        modules: set[str] = set()
        r, shapes = None, None
        for full_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                if not isinstance(module, Linear):
                    raise ConfigTypeError(field_name, name, f"Arrow adapters must target linear layers only; "
                                          f"{full_name!r} is a {type(module.get_base_layer()).__name__}")
                A, B = module.lora_A[name].weight, module.lora_B[name].weight
                modules.add(full_name.split(".")[-1])
                r, shapes = A.shape[0], (tuple(A.shape), tuple(B.shape))
        if reference is None:
            reference = (int(r or 0), (shapes,), modules)
            continue
        for what, mine, theirs in (("rank", r, reference[0]), ("shapes", (shapes,), reference[1]),
                                   ("target modules", modules, reference[2])):
            if mine != theirs:
                raise ConfigError(field_name, name, f"all Arrow adapters must share rank, shapes and target "
                                  f"modules; {what} differ: {mine} != {theirs} (adapter {task_names[0]!r})")
    assert reference is not None
    return sorted(reference[2]), reference[0]


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: ArrowConfig,
                       general_adapter_paths: list[str] | None = None, **adapter_kwargs: Any) -> Any:
    """A :class:`~peftkit.PeftModel` routing with Arrow among the LoRAs at ``task_specific_adapter_paths`` (loaded
    as ``task_0, task_1, ...``), with GenKnowSub over ``general_adapter_paths`` (``gks_0, ...``) when
    ``arrow_config.use_gks``; the active adapter is the router ``"arrow_router"``. ``adapter_kwargs`` go to every
    load. ``arrow_config`` itself is not modified: the router gets a copy with the adapter names set.

    Raises:
        ConfigError: no task adapter; ``use_gks`` without general adapters; ``top_k`` above the number of task
            adapters; adapters with different ranks, shapes or targets.
        ConfigTypeError: ``arrow_config`` is not an ArrowConfig; an adapter targets a non-linear layer.
    """
    from .config import LoraConfig

    if not isinstance(arrow_config, ArrowConfig):
        raise ConfigTypeError("arrow_config", arrow_config, "allowed: an ArrowConfig")
    if not task_specific_adapter_paths:
        raise ConfigError("task_specific_adapter_paths", task_specific_adapter_paths,
                          "allowed: a list of at least one adapter path")
    general = list(general_adapter_paths or [])
    if arrow_config.use_gks and not general:
        raise ConfigError("general_adapter_paths", general_adapter_paths,
                          "use_gks=True needs at least one general LoRA path")
    if arrow_config.top_k > len(task_specific_adapter_paths):
        raise ConfigError("top_k", arrow_config.top_k, f"allowed: at most the number of task adapters "
                          f"({len(task_specific_adapter_paths)})")
    task_names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    gks_names = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general))] if arrow_config.use_gks else []
    model = _load(base_model, task_specific_adapter_paths[0], task_names[0], adapter_kwargs, first=True)
    for name, path in zip(task_names[1:], task_specific_adapter_paths[1:]):
        _load(model, path, name, adapter_kwargs, first=False)
    for name, path in zip(gks_names, general):
        _load(model, path, name, adapter_kwargs, first=False)
    target_modules, r = _check_compatible(model, task_names, gks_names)
    config = dataclasses.replace(arrow_config)
    config.task_adapter_names, config.gks_adapter_names = task_names, gks_names
    model.add_adapter(adapter_name=ROUTER_ADAPTER_NAME,
                      peft_config=LoraConfig(arrow_config=config, target_modules=target_modules, r=r))
    model.set_adapter(ROUTER_ADAPTER_NAME)
    return model
