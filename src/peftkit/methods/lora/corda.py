"""CorDA: context-oriented decomposition adaptation (``init_lora_weights="corda"``, https://arxiv.org/abs/2406.05223).

Two steps, as the reference's ``peft.tuners.lora.corda``:

1. :func:`preprocess_corda` runs the model over a few samples of the user's data, accumulating for every targeted
   ``nn.Linear`` / ``Conv1D`` the covariance ``C: (in, in)`` of its inputs, then decomposes ``W C = U S V_h`` and
   keeps the ``r`` components CorDA uses (``eigens``: ``U: (out, r)``, ``S: (r,)``, ``V = (V_h C^-1)^T: (in, r)``),
   attached to the module as ``module.eigens`` (the reference's attribute and field names, so a model preprocessed
   by either library initialises in either).
2. ``get_peft_model`` with ``init_lora_weights="corda"`` sets ``A = sqrt(S/s) V^T``, ``B = U sqrt(S/s)`` and replaces
   the base weight by ``W - s * B @ A``, so the model's output is unchanged at init (as PiSSA).

Memory is bounded: no activation is stored; each targeted layer holds one ``(in, in)`` accumulator during the pass
(float32 by default: ``4 * in^2`` bytes per layer, about the model's size again for square layers in float16) and
only the cropped ``(out + in + 1) * r`` eigen-tensors afterwards.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ...config import as_subconfig, check
from ...errors import ConfigError, ConfigTypeError
from ...ops.datainit import accumulate_covariance_, corda_eigens, corda_factors

if TYPE_CHECKING:
    from .config import LoraConfig

CORDA_METHODS = ("ipm", "kpm")


@dataclass
class CordaConfig:
    """The reference's ``CordaConfig`` (``LoraConfig(corda_config=...)``; saved as a dict in ``adapter_config.json``).

    Args:
        cache_file: a ``torch.save`` file of the cropped eigens (``{"<module>.eigens.S_WC": ..., ...}``, the
            reference's format): read instead of running the model when it exists, written after preprocessing.
        covariance_file: a file of the per-layer covariances (``{"<module>": (in, in)}``), likewise; reusable for
            other ranks.
        corda_method: ``"ipm"`` (instruction-previewed: the largest components) or ``"kpm"`` (knowledge-preserved:
            the smallest ones).
        verbose: show progress bars even when stderr is not a terminal (they show on a terminal anyway).
        use_float16_for_covariance: accumulate the covariance in the inputs' dtype instead of float32.
        prune_temporary_fields: accepted for compatibility; peftkit never attaches temporary fields to modules.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        check(self.corda_method in CORDA_METHODS, "corda_config.corda_method", self.corda_method,
              f"allowed: {list(CORDA_METHODS)}")
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigTypeError(f"corda_config.{name}", value, "allowed: None or a file path")
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(f"corda_config.{name}", getattr(self, name), "allowed: True or False")


def as_corda_config(value: object) -> CordaConfig | None:
    """``LoraConfig.corda_config`` as a :class:`CordaConfig`: a dict (as loaded from ``adapter_config.json``) is
    converted, None and instances pass through."""
    return as_subconfig("corda_config", value, CordaConfig)


@dataclass
class CordaEigens:
    """The cropped decomposition of one layer: ``S_WC: (r,)``, ``U_WC: (out, r)``, ``V_WC: (in, r)``."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def corda_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``nn.Linear`` / ``Conv1D`` layers ``get_peft_model(model, config)`` will adapt
    (the same plan: ``target_modules`` or the model type's default, ``exclude_modules``, ``layers_to_transform``)."""
    from ...injection.plan import plan_injection
    from ...layers.dispatch import HF_CONV1D, LINEAR
    from ...registry import get_method

    plan = plan_injection(model, config, "default", get_method("LORA"))
    modules = dict(model.named_modules())
    return [(layer.name, modules[layer.name]) for layer in plan.layers
            if layer.options.get("kind") in (LINEAR, HF_CONV1D)]


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as ``(out, in)`` float32 (``Conv1D`` stores ``(in, out)``)."""
    from ...layers.dispatch import HF_CONV1D, module_kind

    weight = module.weight.detach().float()
    return weight.t() if module_kind(module) == HF_CONV1D else weight


def _progress(iterable: Iterable[Any], verbose: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """``iterable`` under a tqdm bar (shown on a terminal, or always with ``verbose``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=False if verbose else None)


def call_with_progress(model: nn.Module, callback: Callable[[], None], verbose: bool, desc: str) -> None:
    """Run the user's ``callback`` under a tqdm bar counting ``model``'s forward calls (its length is unknown)."""
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit="forward", disable=False if verbose else None) as bar:
        handle = model.register_forward_hook(lambda module, args, output: bar.update(1))
        try:
            callback()
        finally:
            handle.remove()


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], None] | Iterable[Any] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Attach CorDA's ``eigens`` to every layer ``get_peft_model(model, lora_config)`` will adapt (the reference's
    ``preprocess_corda``; call it before ``get_peft_model`` with the same config).

    Args:
        model: the model to adapt.
        lora_config: a ``LoraConfig`` with ``init_lora_weights="corda"``; its ``corda_config`` (default
            ``CordaConfig()``) and ``r`` / ``rank_pattern`` (the rank kept per layer).
        run_model: a callable running the model over the calibration data (the reference's API), or an iterable
            of batches (dicts of keyword arguments, or tensors passed positionally), streamed with a progress bar.
            May be None only when ``corda_config.cache_file`` or ``covariance_file`` exists.
        hooked_model: a different model to observe (the same module names); default: ``model``.

    Cost: one forward pass over the data with a forward hook on each targeted layer adding ``O(T * in^2)`` flops
    per sample of ``T`` tokens; one ``(in, in)`` accumulator per layer (float32 unless
    ``use_float16_for_covariance``); no activation kept. Then per layer an ``in x in`` inverse and an SVD of
    ``(out, in)``: ``O(out * in * min(out, in) + in^3)``. Afterwards each layer keeps ``(out + in + 1) * r``
    floats (on the model's device).

    Each sample (a ``(T, in)`` slice of a layer's input: batches of ``B`` sequences count as ``B`` samples) is
    divided by its maximum value before its covariance is added, and the covariance is the mean over samples:
    with batches of one sequence this is exactly the reference's computation, which only supports those.

    Raises:
        ConfigError: ``init_lora_weights`` is not ``"corda"``, or no cache/covariance file exists and
            ``run_model`` is None.
        ValueError: the inputs produce NaN or inf.
    """
    corda_config = _checked_config(lora_config)
    targets = corda_targets(model, lora_config)
    cache = _load(corda_config.cache_file, model)
    if cache is not None:
        _check_keys("corda_config.cache_file", corda_config.cache_file, cache,
                    [f"{name}.eigens.{k}" for name, _ in targets for k in ("S_WC", "U_WC", "V_WC")])
        for name, module in targets:
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")))
        return
    covariances = _load(corda_config.covariance_file, model)
    if covariances is None:
        if run_model is None:
            raise ConfigError("run_model", None, "preprocess_corda needs run_model (a callable or batches) when "
                              "corda_config.cache_file and covariance_file do not exist yet")
        covariances = collect_covariances(hooked_model or model, [n for n, _ in targets], run_model,
                                          corda_config)
        _save(corda_config.covariance_file, covariances)
    else:
        _check_keys("corda_config.covariance_file", corda_config.covariance_file, covariances,
                    [name for name, _ in targets])
    layers = _progress(targets, corda_config.verbose, "CorDA decomposition")
    for name, module in layers:
        r = _rank(lora_config, name)
        S, U, V = corda_eigens(_weight_out_in(module), covariances.pop(name).float(), r, corda_config.corda_method)
        module.eigens = CordaEigens(S_WC=S, U_WC=U, V_WC=V)
    _save(corda_config.cache_file, {f"{name}.eigens.{k}": getattr(module.eigens, k)
                                    for name, module in targets for k in ("S_WC", "U_WC", "V_WC")})


def _check_keys(field: str, path: object, tensors: dict[str, torch.Tensor], wanted: list[str]) -> None:
    """Raise :class:`ConfigError` naming ``field`` when the file at ``path`` lacks some of the ``wanted`` keys."""
    missing = [key for key in wanted if key not in tensors]
    if missing:
        raise ConfigError(field, path, f"the file has no {missing[:3]} ({len(missing)} missing): it was built for "
                          "another model or target_modules; delete it to rebuild")


def _checked_config(lora_config: LoraConfig) -> CordaConfig:
    if lora_config.init_lora_weights != "corda":
        raise ConfigError("init_lora_weights", lora_config.init_lora_weights,
                          "preprocess_corda prepares init_lora_weights='corda'; allowed: 'corda'")
    return as_corda_config(lora_config.corda_config) or CordaConfig()


def _rank(lora_config: LoraConfig, name: str) -> int:
    from ...injection.match import pattern_value

    return int(pattern_value(lora_config.rank_pattern, name, lora_config.r))  # type: ignore[arg-type]


def collect_covariances(model: nn.Module, names: list[str], run_model: Callable[[], None] | Iterable[Any],
                        corda_config: CordaConfig) -> dict[str, torch.Tensor]:
    """``{name: mean input covariance (in, in)}`` of the modules ``names`` of ``model`` over what ``run_model``
    runs (:func:`~peftkit.ops.datainit.accumulate_covariance_` per forward call; a module never called raises)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if name not in sums:
                dtype = x.dtype if corda_config.use_float16_for_covariance else torch.float32
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
            counts[name] += accumulate_covariance_(sums[name], x)
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names if name in modules]
    was_training = model.training
    model.eval()
    try:
        _run(model, run_model, corda_config.verbose)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in names if counts[name] == 0]
    if missing:
        raise ConfigError("run_model", run_model, f"the targeted layers {missing[:5]} never ran; run the model "
                          "on calibration data in run_model")
    return {name: sums[name] / counts[name] for name in names}


def _run(model: nn.Module, run_model: Callable[[], None] | Iterable[Any], verbose: bool) -> None:
    """Call ``run_model``, or feed each of its batches to ``model`` under a progress bar."""
    if callable(run_model):
        call_with_progress(model, run_model, verbose, "CorDA covariance")
        return
    total = len(run_model) if hasattr(run_model, "__len__") else None  # type: ignore[arg-type]
    for batch in _progress(run_model, verbose, "CorDA covariance", total):
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)


def _load(path: str | os.PathLike[str] | None, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The ``torch.save``d dict at ``path`` (tensors only) on the model's device, or None when there is none."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    device = next(iter(model.parameters())).device
    return torch.load(path, map_location=device, weights_only=True)


def _save(path: str | os.PathLike[str] | None, tensors: dict[str, torch.Tensor]) -> None:
    """``torch.save`` ``tensors`` to ``path`` atomically (a temporary file in the same directory, then a rename)."""
    if path is None:
        return
    directory = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".corda-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:  # a file object: torch names the archive after a path's basename
            torch.save(tensors, handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def corda_init(source: nn.Module, weight: torch.Tensor, r: int, scaling: float, options: object = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r), residual: (out, in))`` from the ``eigens`` :func:`preprocess_corda` attached to
    the base layer ``source`` (``weight: (out, in)`` its float32 weight), as the reference's ``corda_init``: the
    eigens are consumed (removed from ``source``). ``options`` is unused (the init table's signature).

    Raises:
        ConfigError: ``source`` has no ``eigens`` (run ``preprocess_corda`` first; to load a trained CorDA adapter
            save it with ``init_lora_weights=True`` or convert it), or their shapes do not fit ``r`` and the layer.
        TypeError: the base weight is not float32, float16 or bfloat16.
    """
    if source.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"CorDA initialises float32, float16 or bfloat16 weights, not {source.weight.dtype}; "
                        "re-quantize the residual model afterwards")
    eigens = getattr(source, "eigens", None)
    if eigens is None:
        raise ConfigError("init_lora_weights", "corda", "the layer has no CorDA eigens: run preprocess_corda(model, "
                          "lora_config, run_model) before get_peft_model; a trained CorDA adapter loads with "
                          "init_lora_weights=True on the residual model, or after conversion "
                          "(save_pretrained(path_initial_model_for_weight_conversion=...))")
    U, S, V = (t.to(weight.device, torch.float32) for t in (eigens.U_WC, eigens.S_WC, eigens.V_WC))
    out_dim, in_dim = weight.shape
    if tuple(U.shape) != (out_dim, r) or tuple(S.shape) != (r,) or tuple(V.shape) != (in_dim, r):
        raise ConfigError("r", r, f"the CorDA eigens have shapes U {tuple(U.shape)}, S {tuple(S.shape)}, "
                          f"V {tuple(V.shape)}; expected ({out_dim}, {r}), ({r},), ({in_dim}, {r}): use the same "
                          "model and rank in preprocess_corda (and its cache file) as in get_peft_model")
    if not all(torch.isfinite(t).all() for t in (U, S, V)):
        raise ValueError("CorDA eigens hold NaN or inf; rebuild them with preprocess_corda")
    A, B = corda_factors(U, S, V, scaling)
    del source.eigens
    return A, B, weight - scaling * B @ A
