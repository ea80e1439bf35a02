"""Small public helpers with the reference's names and semantics.

- ``get_base_model_state_dict`` / ``set_base_model_state_dict``: the base model's weights under their original
  (pre-adapter) keys, e.g. for FSDP or for saving the base separately.
- ``check_if_peft_model``: does a directory or Hub repo hold an ``adapter_config.json``?
- ``rescale_adapter_scale``: a context manager multiplying every LoRA scaling (wise-ft style interpolation).
- ``disable_input_dtype_casting``: a context manager turning off the cast of layer inputs to the adapter dtype.
- ``cast_mixed_precision_params``: frozen parameters to half precision, trainable ones to float32.
- ``shift_tokens_right``: decoder inputs from labels (BART's helper).
- ``MontecloraTrainerMixin``: a ``Trainer`` mixin adding the MonteCLoRA variational loss to the task loss.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .errors import ConfigError, ConfigTypeError, UnsupportedOperationError
from .layers.base import AdapterLayer, AdapterState

#: what ``set_base_model_state_dict`` returns (the reference's namedtuple, as ``nn.Module.load_state_dict``)
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

#: the attribute of a wrapper (``modules_to_save``, trainable tokens) that holds the user's original module
_ORIGINAL_CHILD = "original_module"
#: the attribute of an adapter layer that holds the wrapped module
_BASE_CHILD = "base_layer"


# ---------------------------------------------------------------------- base model state dict
def _wrapped_model(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``model.base_model.model``)."""
    get = getattr(model, "get_base_model", None)
    if not callable(get):
        raise ConfigTypeError("model", type(model).__name__,
                              "allowed: a PeftModel (from get_peft_model or PeftModel.from_pretrained)")
    return get()


def _is_wrapper(module: nn.Module) -> bool:
    """A module that keeps the original module beside per-adapter copies (not an adapter layer)."""
    return isinstance(module, AdapterState) and not isinstance(module, AdapterLayer)


def _own_names(module: nn.Module) -> list[str]:
    """Names of the immediate children, parameters and buffers of ``module``."""
    return [*module._modules, *module._parameters, *module._buffers]


def _adapter_key_prefixes(root: nn.Module) -> set[str]:
    """State-dict key prefixes (relative to ``root``) of everything adapters added.

    Everything on an adapter layer except ``base_layer``; everything on a wrapper except ``original_module``.
    """
    prefixes: set[str] = set()
    for name, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, AdapterLayer):
            keep = _BASE_CHILD
        elif _is_wrapper(module):
            keep = _ORIGINAL_CHILD
        else:
            continue
        prefixes.update(f"{name}.{attr}" if name else attr for attr in _own_names(module) if attr != keep)
    return prefixes


def _is_adapter_key(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _original_key(root: nn.Module, key: str) -> str:
    """``key`` of ``root``'s state dict with the infixes adapters added removed.

    Walks the module tree (never string-replaces): ``base_layer`` inside an adapter layer, ``original_module``
    inside a wrapper and an adapter layer nested in a wrapper are dropped; every other component is kept.
    """
    parts: list[str] = []
    current: nn.Module | None = root
    for part in key.split("."):
        child = current._modules.get(part) if current is not None else None
        if child is None:  # a parameter or buffer name (or below one)
            parts.append(part)
            current = None
        elif (part == _BASE_CHILD and isinstance(current, AdapterLayer)) or (
                part == _ORIGINAL_CHILD and _is_wrapper(current)) or (
                isinstance(child, AdapterLayer) and _is_wrapper(current)):
            current = child
        else:
            parts.append(part)
            current = child
    return ".".join(parts)


def _base_key_map(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """``(wrapped model, {original key: key in the wrapped model's state dict})`` of every base tensor."""
    root = _wrapped_model(model)
    prefixes = _adapter_key_prefixes(root)
    mapping = {_original_key(root, key): key for key in root.state_dict(keep_vars=True)
               if not _is_adapter_key(key, prefixes)}
    return root, mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys (as before ``get_peft_model``), without adapter tensors.

    Args:
        model: a ``PeftModel``.

    Returns:
        ``{original key: tensor}``; ``q_proj.base_layer.weight`` becomes ``q_proj.weight``, the original of a
        ``modules_to_save`` module keeps its name, and adapter tensors (``lora_A``, the ``modules_to_save``
        copies) are left out. Tied weights appear under each of their names, as in ``nn.Module.state_dict``.

    Raises:
        ConfigTypeError: ``model`` is not a ``PeftModel`` (a ``TypeError``).
    """
    root, mapping = _base_key_map(model)
    state = root.state_dict()
    return {original: state[key] for original, key in mapping.items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load ``state_dict`` (original, pre-adapter keys) into the base model inside ``model``.

    The counterpart of :func:`get_base_model_state_dict`; adapter tensors are untouched.

    Args:
        model: a ``PeftModel``.
        state_dict: ``{original key: tensor}``, each tensor of the base tensor's shape.
        strict: raise when keys are missing or unexpected (nothing is loaded then).

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)`` in original keys.

    Raises:
        RuntimeError: ``strict`` and some keys are missing or unexpected (the reference's error and message).
    """
    root, mapping = _base_key_map(model)
    unexpected = [key for key in state_dict if key not in mapping]
    missing = [key for key in mapping if key not in state_dict]
    if strict and (missing or unexpected):
        messages = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + (
            [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(messages))
    translated = {mapping[key]: value for key, value in state_dict.items() if key in mapping}
    root.load_state_dict(translated, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


# ---------------------------------------------------------------------- small helpers
def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether ``model_name_or_path`` (a local directory or Hub repo id) holds a loadable ``adapter_config.json``.

    Any error while reading it (no such file, no network, an invalid config) means False, as in the reference.
    """
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # noqa: BLE001 - the reference's contract: any failure to read the config means "no"
        return False
    return True


def _scaled_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA-family layers of ``model`` (LoRA and AdaLoRA: the reference's ``LoraLayer`` subclasses)."""
    from .methods.adalora.layers import SVDLayer
    from .methods.lora.layers import LoraLayer

    return [m for m in model.modules() if isinstance(m, (LoraLayer, SVDLayer))]


class NoScalingLayersError(UnsupportedOperationError, ValueError):
    """``rescale_adapter_scale`` on a model without LoRA layers (the reference raises ``ValueError``)."""


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float) -> Iterator[None]:
    """Multiply the ``scaling`` of every LoRA adapter in ``model`` by ``multiplier`` inside the block.

    The update becomes ``multiplier * scaling * B @ A``; with ``multiplier`` in [0, 1] this is wise-ft between the
    base and the fine-tuned model. The original scalings are restored on exit, also after an exception.

    Raises:
        ConfigTypeError: ``multiplier`` is not a float or int (a ``TypeError``, as the reference).
        UnsupportedOperationError: ``model`` holds no LoRA layer (also a ``ValueError``, which the reference raises).
    """
    if not isinstance(multiplier, (float, int)):
        raise ConfigTypeError("multiplier", type(multiplier).__name__, "allowed: a float or int")
    layers = _scaled_layers(model)
    if not layers:
        raise NoScalingLayersError(
            f"scaling is only supported for models with `LoraLayer`s; {type(model).__name__} holds none "
            "(allowed: a model with LoRA or AdaLoRA adapters)")
    original = {layer: layer.scaling.copy() for layer in layers}
    for layer in layers:
        # a new dict of new floats: cached forward plans compare the scaling by identity and rebuild
        layer.scaling = {name: value * multiplier for name, value in layer.scaling.items()}
    try:
        yield
    finally:
        for layer, scaling in original.items():
            layer.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Inside the block, adapter layers do not cast their input to the adapter weights' dtype.

    For setups where forward hooks already manage dtypes (diffusers' layerwise casting). Each adapter layer's
    ``cast_input_dtype_enabled`` is set to False and restored on exit. ``active=False``: a no-op.
    """
    if not active:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    original = {layer: layer.__dict__.get("cast_input_dtype_enabled") for layer in layers}
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in original.items():
            if value is None:
                layer.__dict__.pop("cast_input_dtype_enabled", None)
            else:
                layer.cast_input_dtype_enabled = value


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen parameters of ``model`` to ``dtype`` and trainable ones to float32, in place.

    For automatic mixed-precision training: the frozen base in half precision saves memory, the trainable adapter
    in float32 keeps the optimizer stable. Parameter objects are kept (their ``.data`` is replaced), so optimizers
    and hooks holding them stay valid.

    Raises:
        ConfigTypeError: ``dtype`` is not a ``torch.dtype`` (a ``TypeError``).
    """
    if not isinstance(dtype, torch.dtype):
        raise ConfigTypeError("dtype", dtype, f"allowed: a torch.dtype, usually one of {list(_HALF_DTYPES)}")
    for param in model.parameters():
        param.data = param.to(torch.float32 if param.requires_grad else dtype)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Shift ``input_ids`` one token to the right (decoder inputs from labels).

    Args:
        input_ids: ``(batch, seq)`` token ids; ``-100`` (ignored label) becomes ``pad_token_id``.
        pad_token_id: the padding id; must not be None.
        decoder_start_token_id: the id put in column 0.

    Returns:
        ``(batch, seq)``: ``[start, ids[:, 0], ..., ids[:, -2]]`` per row.

    Raises:
        ConfigError: ``pad_token_id`` is None (a ``ValueError``, as the reference).
    """
    if pad_token_id is None:
        raise ConfigError("pad_token_id", None, "the model config's pad_token_id has to be defined (an int)")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


class MontecloraTrainerMixin:
    """The reference's mixin for a ``transformers.Trainer`` subclass (``class MyTrainer(MontecloraTrainerMixin,
    Trainer)``): ``compute_loss`` adds the MonteCLoRA variational loss (``_get_monteclora_loss()`` of each LoRA
    tuner in the model, averaged over the tuners when there are several) to the task loss; a no-op without
    MonteCLoRA adapters."""

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The parent's loss (and outputs with ``return_outputs``) plus the variational loss."""
        parent = super().compute_loss  # type: ignore[misc]
        if return_outputs:
            task_loss, outputs = parent(model, inputs, return_outputs=True, **kwargs)
        else:
            task_loss, outputs = parent(model, inputs, return_outputs=False, **kwargs), None
        terms = [m._get_monteclora_loss() for m in model.modules()
                 if callable(getattr(type(m), "_get_monteclora_loss", None))]
        extra = sum(terms) / len(terms) if len(terms) > 1 else (terms[0] if terms else 0.0)
        total = task_loss + extra
        return (total, outputs) if return_outputs else total


__all__ = [
    "IncompatibleKeys",
    "MontecloraTrainerMixin",
    "NoScalingLayersError",
    "cast_mixed_precision_params",
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "get_base_model_state_dict",
    "rescale_adapter_scale",
    "set_base_model_state_dict",
    "shift_tokens_right",
]
