"""EVA (Explained Variance Adaptation, arXiv:2410.07170): LoRA's ``A`` from the top right-singular vectors of each
targeted layer's *inputs* over the user's data, with the ranks redistributed across layers by explained variance.

Use it as the reference's API: ``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))``, then
``get_peft_model`` (the adapter starts as a placeholder: ``B = 0``, so the model is unchanged), then
``initialize_lora_eva_weights(peft_model, dataloader)``, which streams over ``dataloader`` and

- for each targeted ``nn.Linear`` / GPT-2 ``Conv1D`` runs an incremental PCA (:mod:`peftkit.ops.incremental_pca`) of
  its inputs ``x: (tokens, in)`` (padding, and with ``use_label_mask`` positions whose label is ``label_mask_value``,
  left out), keeping ``round(r_layer · rho)`` components;
- hands out the rank budget ``sum(r_layer)`` to the largest explained-variance ratios over all layers (a layer may
  get 0 to ``round(r·rho)`` components; layers that receive the same input share one PCA);
- stops once, for every layer, the components it was given have a cosine similarity ``>= tau`` with those of the
  previous step;
- sets ``lora_A = components[:rank]: (rank, in)`` (divided by ``sqrt(singular values)`` with ``whiten``), re-creates
  layers whose rank changed (``lora_alpha`` scaled by ``rank / r`` with ``adjust_scaling_factors``), removes layers
  given rank 0, and records the result in the adapter's config (``rank_pattern``, ``alpha_pattern``,
  ``target_modules``) so that the saved adapter loads in the reference and here.

Cost: one forward pass of the first batch (to find layers with equal inputs) plus one forward pass per step until every
layer has converged (the loader is re-iterated as often as needed; layers that converged stop being hooked). Memory,
per PCA: the running state ``O(round(r·rho) · in)`` (float64), and during a step the stacked
``(round(r·rho) + tokens + 1, in)`` matrix of that step's tokens and its ``2·round(r·rho)``-column sketch. Activations
are never kept across steps.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import check, is_number
from ...errors import AdapterConflictError, ConfigError, ConfigTypeError, PeftWarning
from ...injection.match import in_layers, matches, pattern_value
from ...layers.dispatch import is_hf_conv1d
from ...ops.incremental_pca import PCAState, cosine_converged, incremental_pca_update

#: the seed of the randomized SVD's test matrix (the reference's ``lowrank_seed``)
SVD_SEED = 42
#: ``rho`` above this is capped at ``max parameter dim // r`` (the reference's guard)
RHO_THRESHOLD = 1000


@dataclass
class EvaConfig:
    """Options of EVA (the reference's ``EvaConfig``: field names, defaults and checks).

    Args:
        rho: ``>= 1``; a layer may receive up to ``round(r · rho)`` components (``1.0``: no redistribution).
        tau: in ``[0, 1]``; a component has converged when its cosine similarity with the previous step's is ``>=
            tau``.
        use_label_mask: leave out positions whose ``labels`` equal ``label_mask_value``.
        label_mask_value: the ignored label (``-100``).
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale ``lora_alpha`` by ``new_rank / r`` for layers whose rank changed.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        for name in ("rho", "tau"):
            if not is_number(getattr(self, name)):
                raise ConfigTypeError(name, getattr(self, name), "allowed: a number")
        check(self.rho >= 1.0, "rho", self.rho, "allowed: a number >= 1.0 (the maximum rank of a layer is r * rho)")
        check(0.0 <= self.tau <= 1.0, "tau", self.tau, "allowed: a number between 0.0 and 1.0")


def eva_subconfig(value: object, init_lora_weights: object) -> EvaConfig | None:
    """``LoraConfig.eva_config`` normalised at construction, as the reference: a dict (as loaded from
    ``adapter_config.json``) becomes an :class:`EvaConfig`; None with ``init_lora_weights="eva"`` becomes the default
    (warned). Raises :class:`ConfigTypeError` naming ``eva_config`` for any other type."""
    if value is None:
        if init_lora_weights == "eva":
            warnings.warn("init_lora_weights='eva' but eva_config is not specified; using the default EvaConfig()",
                          PeftWarning, stacklevel=5)
            return EvaConfig()
        return None
    if isinstance(value, EvaConfig):
        return value
    if isinstance(value, dict):
        known = set(EvaConfig.__dataclass_fields__)
        return EvaConfig(**{k: v for k, v in value.items() if k in known})
    raise ConfigTypeError("eva_config", value, "allowed: None, an EvaConfig or a dict of its fields")


# ------------------------------------------------------------------------------------------- input preparation

def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """The default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor], peft_config: Any
                                              ) -> torch.Tensor:
    """Positions to use: ``(n, 2)`` indices ``(batch, position)`` where ``attention_mask`` is set and (with
    ``use_label_mask``) ``labels != label_mask_value``."""
    if not isinstance(model_input, Mapping):
        raise TypeError("prepare_model_inputs_fn_language_modeling: the model inputs must be a dict, got "
                        f"{type(model_input).__name__}; pass prepare_model_inputs_fn=None or your own function")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(f"unsupported input type {type(layer_input).__name__} for prepare_layer_inputs_fn in layer "
                    f"{layer_name!r}; please provide a custom prepare_layer_inputs_fn")


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str
                                              ) -> torch.Tensor:
    """The rows of the layer input ``(batch, seq, in)`` at the positions ``model_input: (n, 2)``: ``(n, in)``."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _prepare_layer_inputs_default(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Without a preparation function: the first input, flattened to ``(-1, in)``."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def _gather(x: torch.Tensor) -> torch.Tensor:
    """``x: (n_rank, in)`` from every process concatenated (the reference's padded ``all_gather``)."""
    import torch.distributed as dist

    sizes = torch.empty(dist.get_world_size(), dtype=torch.long, device=x.device)
    dist.all_gather_into_tensor(sizes, torch.tensor([x.shape[0]], device=x.device))
    counts = sizes.tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


# ------------------------------------------------------------------------------------------------------- hooks

class _Hook:
    """A forward hook that turns a layer's input into EVA's samples ``(n, in)``."""

    def __init__(self, name: str, prepare_fn: Callable[..., torch.Tensor] | None, gather: bool) -> None:
        self.name = name
        self.prepare_fn = prepare_fn or _prepare_layer_inputs_default
        self.gather = gather
        self.model_input: Any = None

    @torch.no_grad()
    def samples(self, layer_input: Any) -> torch.Tensor:
        x = self.prepare_fn(layer_input, self.model_input, self.name)
        import torch.distributed as dist

        return _gather(x) if self.gather and dist.is_available() and dist.is_initialized() else x


class _FingerprintHook(_Hook):
    """Records a fingerprint of the first input it sees, to find layers fed the same tensor (q/k/v, gate/up):
    shape, dtype and three float64 reductions (sum, squares, a fixed random projection). Equal inputs give equal
    fingerprints (same kernels, same data); unequal ones colliding on all three is not a practical concern. Replaces
    the reference's hash of the whole input as a Python tuple (bounded time and memory)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.fingerprint: tuple[Any, ...] | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.fingerprint is not None:
            return
        x = self.samples(args).double()
        generator = torch.Generator(device=x.device)
        generator.manual_seed(0)
        w = torch.randn(x.shape[-1], dtype=torch.float64, device=x.device, generator=generator)
        sums = torch.stack([x.sum(), x.square().sum(), (x @ w).sum()]).tolist()
        self.fingerprint = (tuple(x.shape), *sums)


class _PCAHook(_Hook):
    """One incremental-PCA step per forward pass; ``converged: (k,)`` says which components moved less than
    ``tau`` (cosine similarity) in the last step."""

    def __init__(self, name: str, prepare_fn: Callable[..., torch.Tensor] | None, gather: bool, n_components: int,
                 tau: float) -> None:
        super().__init__(name, prepare_fn, gather)
        self.state = PCAState(n_components=n_components)
        self.tau = tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        x = self.samples(args)
        if x.shape[0] < self.state.n_components:  # too few tokens in this batch for a step: skip it
            return
        previous = self.state.components
        self.state = incremental_pca_update(self.state, x.to(torch.float32), seed=SVD_SEED)
        if previous is not None:
            assert self.state.components is not None
            self.converged = cosine_converged(previous, self.state.components, self.tau)


# --------------------------------------------------------------------------------------------- rank allocation

def _rank_distribution(pcas: dict[str, _PCAHook], layer_to_pca: dict[str, str], shared: dict[str, str],
                       budget: int, max_components: dict[str, int]) -> dict[str, int]:
    """Ranks per layer: the ``budget`` largest explained-variance ratios over all layers (each layer offering its
    first ``max_components`` ratios; a layer sharing another's PCA offers the same ratios). A layer whose input
    equals a hooked layer's never gets more than the hooked one (their ranks are swapped), as the reference."""
    keys = [layer for layer, pca in layer_to_pca.items() for _ in range(max_components[layer])]
    ratios = torch.cat([pcas[pca].state.explained_variance_ratio[: max_components[layer]]  # type: ignore[index]
                        for layer, pca in layer_to_pca.items()])
    order = ratios.argsort(descending=True, stable=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {layer: counts.get(layer, 0) for layer in layer_to_pca}
    for layer, hooked in shared.items():
        if ranks[hooked] < ranks[layer]:
            ranks[hooked], ranks[layer] = ranks[layer], ranks[hooked]
    return ranks


# -------------------------------------------------------------------------------------------------- targets

def _unsupported_layers() -> tuple[type, ...]:
    from .layers import Conv, Embedding
    from .mha import MultiheadAttention
    from .param import ParamLayer

    return Embedding, Conv, MultiheadAttention, ParamLayer


def _targets(model: nn.Module, config: Any, is_peft_model: bool) -> list[tuple[str, nn.Module]]:
    """The layers EVA initialises: a PeftModel's LoRA layers other than embeddings, convolutions, attention and
    parameter targets; on a plain model the ``nn.Linear`` / ``Conv1D`` modules ``config`` targets (every one when
    ``target_modules`` is None, as the reference)."""
    from .layers import LoraLayer

    if is_peft_model:
        unsupported = _unsupported_layers()
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
                and not isinstance(m, unsupported)]
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        from ...injection.plan import all_linear_names

        targets = all_linear_names(model, config)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or is_hf_conv1d(m)
            if targets is None or (matches(targets, n) and not matches(config.exclude_modules, n)
                                   and (isinstance(targets, str) or in_layers(n, config.layers_to_transform,
                                                                              config.layers_pattern)))]


def _move(inputs: Any, device: torch.device | None) -> Any:
    """``inputs`` (a tensor, or a dict / list / tuple of them) on ``device`` (the reference's helper)."""
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def _model_device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _batches(dataloader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches over and over (re-iterating it: unlike ``itertools.cycle`` nothing is kept)."""
    while True:
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            return


# ------------------------------------------------------------------------------------------ get_eva_state_dict

@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor] | dict[str, Callable[..., torch.Tensor]] | None = (
        prepare_layer_inputs_fn_language_modeling),
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's components per layer: ``{layer name: (rank, in)}`` after the rank redistribution (a layer given rank 0
    maps to a ``(0, in)`` tensor). See the module docstring for the algorithm.

    Cost: ``1 + steps`` forward passes under ``no_grad`` (the first batch once to find layers with equal inputs, then
    one batch per step until every layer converged; layers that converged are no longer hooked). Memory per layer
    with its own input: the PCA state, ``k · in + 2 · in`` float64 values with ``k = round(r · rho)``, plus, during
    its step only, the ``(k + tokens + 1, in)`` stacked matrix and a ``2k``-column sketch. No activation is kept
    after its step, and no batch after its forward pass.

    Args:
        model: a PeftModel (its LoRA layers are analysed with the adapters disabled), or a plain model with
            ``peft_config`` (a ``LoraConfig`` whose ``eva_config`` applies).
        dataloader: a sized, re-iterable loader of batches (``len()`` must be > 0).
        forward_fn: ``(model, batch) -> Any``; default ``model(**batch)``.
        prepare_model_inputs_fn: ``(batch, peft_config) -> Any`` handed to the layer hooks (default: the
            ``(n, 2)`` positions of real tokens); None: a copy of the batch.
        prepare_layer_inputs_fn: ``(layer_input, model_input, layer_name) -> (n, in)``, or a dict of them by layer
            name (every key must name a targeted layer); None: the input flattened to ``(-1, in)``.
        gather_distributed_inputs: under ``torch.distributed``, concatenate every process's samples.
        show_progress_bar: a tqdm bar counting steps and converged layers.

    Raises:
        ConfigError: no ``peft_config`` for a plain model, an empty ``dataloader``, or ``prepare_layer_inputs_fn``
            keys that name no targeted layer.
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ConfigError("peft_config", None, "allowed: a LoraConfig when model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    eva = peft_config.eva_config if peft_config.eva_config is not None else EvaConfig()
    if peft_config.eva_config is None:
        peft_config = peft_config.copy(eva_config=eva)
    if len(dataloader) == 0:  # type: ignore[arg-type]
        raise ConfigError("dataloader", dataloader, "allowed: a non-empty data loader")
    context = model.disable_adapter() if is_peft_model else nullcontext()
    with context:
        run = _EvaRun(model, peft_config, eva, forward_fn or forward_fn_dict, prepare_model_inputs_fn,
                      prepare_layer_inputs_fn, gather_distributed_inputs)
        return run.compute(dataloader, is_peft_model, show_progress_bar)


class _EvaRun:
    """The state of one ``get_eva_state_dict`` call (hooks, budgets); :meth:`compute` runs it."""

    def __init__(self, model: nn.Module, config: Any, eva: EvaConfig, forward_fn: Callable[[nn.Module, Any], Any],
                 prepare_model_inputs_fn: Callable[[Any, Any], Any] | None,
                 prepare_layer_inputs_fn: Any, gather: bool) -> None:
        self.model, self.config, self.eva, self.forward_fn = model, config, eva, forward_fn
        self.prepare_model_inputs_fn, self.prepare_layer_inputs_fn = prepare_model_inputs_fn, prepare_layer_inputs_fn
        self.gather = gather
        self.device = _model_device(model)

    def _model_input(self, batch: Any) -> Any:
        if self.prepare_model_inputs_fn is None:
            return deepcopy(batch)
        return self.prepare_model_inputs_fn(batch, self.config)

    def _rho(self) -> float:
        rho = self.eva.rho
        if rho > RHO_THRESHOLD:
            max_dim = max(max(p.shape) for p in self.model.parameters())
            rho = min(rho, max_dim // self.config.r)
        return rho

    def _prepare_fns(self, names: list[str]) -> dict[str, Callable[..., torch.Tensor] | None]:
        fns = self.prepare_layer_inputs_fn
        if not isinstance(fns, Mapping):
            return dict.fromkeys(names, fns)
        unknown = sorted(set(fns) - set(names))
        if unknown:
            raise ConfigError("prepare_layer_inputs_fn", unknown,
                              f"its keys must name targeted layers; found no layer {unknown}")
        return {name: fns.get(name) for name in names}

    def compute(self, dataloader: Iterable[Any], is_peft_model: bool, show_progress_bar: bool
                ) -> dict[str, torch.Tensor]:
        training = self.model.training
        self.model.eval()
        try:
            layers = dict(_targets(self.model, self.config, is_peft_model))
            rho = self._rho()
            ranks = {n: int(pattern_value(self.config.rank_pattern, n, self.config.r)) for n in layers}  # type: ignore[call-overload]
            max_components = {n: round(r * rho) for n, r in ranks.items()}
            prepare = self._prepare_fns(list(layers))
            shared = self._shared_inputs(dataloader, layers, prepare, max_components)
            pcas = {n: _PCAHook(n, prepare[n], self.gather, max_components[n], self.eva.tau)
                    for n in layers if n not in shared}
            layer_to_pca = {**{n: n for n in pcas}, **shared}
            rank_dist = self._stream(dataloader, layers, pcas, layer_to_pca, shared, sum(ranks.values()),
                                     max_components, show_progress_bar)
        finally:
            self.model.train(training)
        return self._components(pcas, layer_to_pca, rank_dist)

    def _shared_inputs(self, dataloader: Iterable[Any], layers: dict[str, nn.Module],
                       prepare: dict[str, Any], max_components: dict[str, int]) -> dict[str, str]:
        """One forward pass of the first batch: ``{layer: the first layer with an equal input}`` for layers whose
        input equals an earlier layer's (they share its PCA; ``max_components`` is raised to the group's max)."""
        batch = _move(next(iter(dataloader)), self.device)
        model_input = self._model_input(batch)
        hooks = {n: _FingerprintHook(n, prepare[n], self.gather) for n in layers}
        handles = []
        try:
            for name, hook in hooks.items():
                hook.model_input = model_input
                handles.append(layers[name].register_forward_hook(hook))
            self.forward_fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        silent = [name for name, hook in hooks.items() if hook.fingerprint is None]
        if silent:  # the reference fails here with an IndexError; their PCA would never start
            raise ConfigError("target_modules", silent, "EVA needs every targeted layer to run in the forward pass; "
                              "these did not run on the first batch: exclude them from target_modules")
        groups: dict[Any, list[str]] = {}
        for name, hook in hooks.items():
            groups.setdefault(hook.fingerprint, []).append(name)
        shared = {}
        for names in groups.values():
            if len(names) > 1:
                top = max(max_components[n] for n in names)
                for n in names:
                    max_components[n] = top
                shared.update(dict.fromkeys(names[1:], names[0]))
        return shared

    def _stream(self, dataloader: Iterable[Any], layers: dict[str, nn.Module], pcas: dict[str, _PCAHook],
                layer_to_pca: dict[str, str], shared: dict[str, str], budget: int,
                max_components: dict[str, int], show_progress_bar: bool) -> dict[str, int]:
        """Forward passes until every hooked layer's allotted components converged; the final ranks."""
        handles = {n: layers[n].register_forward_hook(h) for n, h in pcas.items()}
        rank_dist = dict(max_components)
        done = dict.fromkeys(pcas, False)
        bar = _progress(show_progress_bar)
        try:
            for step, batch in enumerate(_batches(dataloader)):
                self._check_progress(step, len(dataloader), pcas)  # type: ignore[arg-type]
                batch = _move(batch, self.device)
                model_input = self._model_input(batch)
                for name, hook in pcas.items():
                    converged = bool(torch.all(hook.converged[: rank_dist[name]]))
                    if converged and not done[name]:  # converged now: stop hooking it
                        handles.pop(name).remove()
                    elif done[name] and not converged:  # given more components since: hook it again
                        handles[name] = layers[name].register_forward_hook(hook)
                    done[name] = converged
                    hook.model_input = model_input
                n_done = sum(done.values()) + sum(done[p] for p in shared.values())
                if bar is not None:
                    bar.set_description(f"{n_done}/{len(layer_to_pca)} layers have converged")
                    bar.update(1)
                if all(done.values()):
                    break
                self.forward_fn(self.model, batch)
                if all(h.state.fitted for h in pcas.values()):
                    rank_dist = _rank_distribution(pcas, layer_to_pca, shared, budget, max_components)
        finally:
            for handle in handles.values():
                handle.remove()
            if bar is not None:
                bar.close()
        return rank_dist

    @staticmethod
    def _check_progress(step: int, n_batches: int, pcas: dict[str, _PCAHook]) -> None:
        """After a whole pass over the loader every PCA must have started; otherwise no batch holds enough tokens
        (after the masks) for its components and the reference would loop forever."""
        stuck = [name for name, hook in pcas.items() if not hook.state.fitted]
        if step >= n_batches and stuck:
            k = max(pcas[name].state.n_components for name in stuck)
            raise ConfigError("dataloader", f"{n_batches} batches", f"every batch gave layers {stuck[:5]} fewer "
                              f"usable tokens (attention/label mask applied) than their {k} components; use larger "
                              "batches, use_label_mask=False or a smaller rho / r")

    def _components(self, pcas: dict[str, _PCAHook], layer_to_pca: dict[str, str], rank_dist: dict[str, int]
                    ) -> dict[str, torch.Tensor]:
        result = {}
        for name, rank in rank_dist.items():
            state = pcas[layer_to_pca[name]].state
            assert state.components is not None and state.singular_values is not None
            u = state.components[:rank]
            if self.eva.whiten:  # out of place: layers sharing a PCA are each whitened once
                u = u / state.singular_values[:rank].sqrt().reshape(-1, 1)
            result[name] = u if self.device is None else u.to(self.device)
        return result


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(position=0, leave=False, unit="step")


# ----------------------------------------------------------------------------------- initialize_lora_eva_weights

@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor] | dict[str, Callable[..., torch.Tensor]] | None = (
        prepare_layer_inputs_fn_language_modeling),
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Initialise the ``init_lora_weights="eva"`` adapter ``adapter_name`` of the PeftModel ``model`` in place from
    ``eva_state_dict`` (computed by :func:`get_eva_state_dict` over ``dataloader`` when None): ``lora_A`` becomes the
    layer's components ``(rank, in)``, ``lora_B`` stays 0 (the model output is unchanged). Layers whose rank changed
    are re-created (``lora_alpha *= rank / r`` with ``adjust_scaling_factors``); layers given rank 0 lose their LoRA
    layer; LoRA layers EVA does not cover (embeddings, convolutions) get the default init (warned). The adapter's
    config then records ``rank_pattern`` / ``alpha_pattern`` / ``target_modules``. Returns ``model``.

    Raises:
        ConfigError: ``model`` is not a PeftModel, the adapter's ``init_lora_weights`` is not ``"eva"``, or neither
            ``dataloader`` nor ``eva_state_dict`` is given.
        AdapterConflictError: more than one adapter is active.
    """
    if not hasattr(model, "peft_config"):
        raise ConfigError("model", type(model).__name__, "allowed: a PeftModel (from get_peft_model)")
    if len(model.active_adapters) > 1:
        raise AdapterConflictError(f"initialize_lora_eva_weights works with a single active adapter; active: "
                                   f"{list(model.active_adapters)}")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ConfigError("init_lora_weights", config.init_lora_weights,
                          "initialize_lora_eva_weights needs an adapter created with init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("dataloader", None, "allowed: a data loader, required when eva_state_dict is None")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, dict(eva_state_dict), adapter_name)
    return model


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    from .layers import LoraLayer

    config = model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    tuner = model.base_model
    prefix = "base_model.model."
    kept, missing, removed, rank_pattern, alpha_pattern = [], [], [], {}, {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        short = name.removeprefix(prefix)
        r = int(pattern_value(config.rank_pattern, name, config.r))  # type: ignore[call-overload]
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        w = eva_state_dict.pop(name, None)
        if w is None:
            _recreate(module, adapter_name, config, r, alpha, True)
            missing.append(short)
            new_rank = r
        elif w.shape[0] == 0:
            _remove_layer(model, name, module)
            removed.append(short)
            continue
        else:
            new_rank = w.shape[0]
            if new_rank != r and eva.adjust_scaling_factors:
                alpha = alpha * new_rank / r
            lora_A = module.lora_A[adapter_name].weight
            if new_rank != r or lora_A.is_meta:
                _recreate(module, adapter_name, config, new_rank, alpha, "eva")
            module.lora_A[adapter_name].weight.copy_(w.reshape(module.lora_A[adapter_name].weight.shape))
            kept.append(short)
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
        tuner._refresh_trainability([module])
    tuner.targeted_module_names = [n for n in tuner.targeted_module_names if n not in removed]
    tuner.peft_config[adapter_name] = config.copy(target_modules=kept + missing, rank_pattern=rank_pattern,
                                                  alpha_pattern=alpha_pattern)
    if missing:
        warnings.warn(f"the following layers were initialized with init_lora_weights=True because they were not found "
                      f"in the eva state_dict: {missing}; EVA does not initialise embeddings, convolutions, "
                      "MultiheadAttention or target_parameters layers", PeftWarning, stacklevel=3)


def _recreate(module: nn.Module, adapter_name: str, config: Any, r: int, alpha: float, init: bool | str) -> None:
    """Re-create the adapter's weights on ``module`` with rank ``r`` (keeping their dtype)."""
    dtype = module.lora_A[adapter_name].weight.dtype if adapter_name in module.lora_A else None
    module.update_layer(adapter_name, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                        init_lora_weights=init, use_rslora=config.use_rslora, lora_bias=config.lora_bias,
                        use_dora=config.use_dora, dtype=dtype)


def _remove_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put the base layer back in place of the LoRA layer ``name`` (its adapter got rank 0)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module.get_base_layer())


__all__ = ["EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights"]
