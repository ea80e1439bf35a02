"""Multi-process training of adapters: FSDP wrapping helpers, gathering a full state dict, clean shutdown.

Adapter parameters are ordinary ``nn.Parameter``s inside the model's modules, so data parallelism needs nothing
special:

* **DDP** (``torch.nn.parallel.DistributedDataParallel``, ``accelerate``, ``Trainer``): wrap the ``PeftModel`` as
  any model. ``find_unused_parameters`` is not needed: peftkit freezes the adapters that are not active, so every
  parameter with ``requires_grad`` takes part in the forward. (Set it only if you make inactive adapters trainable
  yourself, or train a prompt-learning adapter whose encoder skips some inputs.) DDP broadcasts rank 0's parameters
  when it wraps the model, so all ranks start from the same adapter even when their initial seeds differ.
* **FSDP (v1)**: pass ``auto_wrap_policy=fsdp_auto_wrap_policy(model)`` and ``use_orig_params=True``. Decoder layers
  become units; adapter weights stay in the unit of the layer they adapt (prompt encoders in the root unit), because
  peftkit reads ``lora_A``/``lora_B``/prompt-embedding weights without calling those submodules, so separate units
  for them, as the reference's policy makes, would never be gathered. A unit then holds trainable and frozen
  parameters, which FSDP1 allows with ``use_orig_params=True``.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): :func:`fully_shard_model` shards each decoder layer, then the
  root. FSDP2 shards per parameter, so frozen and trainable parameters may share a unit.
* Saving: gather with :func:`full_state_dict` on every rank (a collective), then
  ``model.save_pretrained(dir, state_dict=sd, is_main_process=rank == 0)``.
* End the script with :func:`shutdown` (``barrier`` + ``destroy_process_group``): without it a torchrun job whose
  rank 0 still writes files after the last collective can abort at exit.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

#: environment variable that overrides the layer classes to wrap (comma-separated class names), as in the reference
WRAP_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"

__all__ = ["fsdp_auto_wrap_policy", "full_state_dict", "fully_shard_model", "layer_classes_to_wrap", "shutdown"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``model.get_base_model()``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _no_split_names(model: nn.Module) -> list[str]:
    """Class names of the blocks transformers never splits (``_no_split_modules``, e.g. ``LlamaDecoderLayer``)."""
    names: list[str] = []
    for module in _unwrap(model).modules():
        for name in getattr(module, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    return names


def layer_classes_to_wrap(model: nn.Module, class_names: Iterable[str] | None = None) -> set[type[nn.Module]]:
    """The module classes that get their own FSDP unit: ``class_names`` (default: the env var
    ``FSDP_TRANSFORMER_CLS_TO_WRAP``, else the model's ``_no_split_modules``, e.g. the decoder layers).

    Prompt encoders are not among them (the reference wraps them): peftkit reads a prompt-tuning encoder's
    ``embedding.weight`` without calling the encoder, so its parameters belong in the root unit, which is gathered
    when the ``PeftModel``'s forward starts.

    Raises :class:`ConfigError` naming a class that no module of ``model`` has.
    """
    if class_names is None:
        env = os.environ.get(WRAP_ENV)
        class_names = env.split(",") if env is not None else _no_split_names(model)
    by_name: dict[str, type[nn.Module]] = {}
    for module in model.modules():
        by_name.setdefault(type(module).__name__, type(module))
    classes: set[type[nn.Module]] = set()
    for name in (n.strip() for n in class_names):
        if not name:
            continue
        if name not in by_name:
            raise ConfigError(WRAP_ENV, name, f"no module of {type(model).__name__} has this class; allowed: class "
                              f"names of its modules, e.g. {sorted(by_name)[:8]}")
        classes.add(by_name[name])
    return classes


def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An ``auto_wrap_policy`` for ``torch.distributed.fsdp.FullyShardedDataParallel`` (FSDP v1), the counterpart
    of the reference's ``fsdp_auto_wrap_policy(model)``: every module of :func:`layer_classes_to_wrap` (decoder
    layers from ``_no_split_modules`` or ``FSDP_TRANSFORMER_CLS_TO_WRAP``) becomes a unit.

    Unlike the reference's, it does not make units of the trainable leaf modules (``lora_A``, ``lora_B``) or of
    prompt encoders: peftkit uses those weights without calling the submodules, so such units would never be
    gathered (training fails with "Output 0 of View is a view ... modified inplace"). Wrap with
    ``use_orig_params=True``, since a unit then holds both frozen and trainable parameters.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes_to_wrap(model))


def fully_shard_model(
    model: nn.Module,
    class_names: Iterable[str] | None = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to every module of :func:`layer_classes_to_wrap` (innermost first), then to
    ``model`` itself; returns ``model`` (now an ``FSDPModule``). Needs an initialised process group.

    ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to every call. Adapters need
    no unit of their own: FSDP2 shards parameter by parameter and keeps ``requires_grad`` per parameter. Build the
    optimizer after this call (the parameters become ``DTensor`` shards).
    """
    from torch.distributed.fsdp import fully_shard

    classes = tuple(layer_classes_to_wrap(model, class_names))
    blocks = [m for m in model.modules() if isinstance(m, classes) and m is not model]
    for block in reversed(blocks):  # children before their parents
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


#: names FSDP1 / activation checkpointing insert into module paths of a wrapped model
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def full_state_dict(model: nn.Module, cpu_offload: bool | None = None) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict, for ``model.save_pretrained(dir, state_dict=...)``.

    A collective under FSDP/FSDP2: call it on every rank. Keys are the unwrapped model's; for an FSDP1-wrapped model
    the wrapped paths (``..._fsdp_wrapped_module.<name>``) are added as aliases, so ``save_pretrained`` of the
    ``PeftModel`` inside finds its tensors. ``cpu_offload`` (default: only when a parameter is off the CPU) gathers
    the tensors to rank 0's CPU memory and leaves other ranks an empty dict; without it every rank gets everything.
    Works for DDP-wrapped and plain models too.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if cpu_offload is None:
        cpu_offload = any(p.device.type != "cpu" for p in inner.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    state = get_model_state_dict(inner, options=options)
    state.update(_wrapped_aliases(inner, state))
    return state


def _wrapped_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{wrapped path: tensor}`` for the parameters whose module path holds FSDP1 wrapper segments, both from
    ``model`` and from the module it wraps (``model._fsdp_wrapped_module``, e.g. the ``PeftModel``)."""
    aliases: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        for pname in module._parameters:
            full = f"{path}.{pname}" if path else pname
            clean = full
            for segment in _WRAPPER_SEGMENTS:
                clean = clean.replace(segment, "")
            if clean == full or clean not in state:
                continue
            aliases[full] = state[clean]
            for segment in _WRAPPER_SEGMENTS:
                if full.startswith(segment):
                    aliases[full.removeprefix(segment)] = state[clean]
    return aliases


def shutdown() -> None:
    """``barrier()`` then ``destroy_process_group()`` when a process group is up (no-op otherwise).

    Call it at the end of a distributed script: ranks that finish while rank 0 still saves, or a process group left
    alive at interpreter exit, make torchrun report a failure (SIGABRT) after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
