"""LoftQ (https://arxiv.org/abs/2310.08659): LoRA factors that absorb the quantization error of the base weight.

``init_lora_weights="loftq"`` with ``loftq_config=LoftQConfig(loftq_bits, loftq_iter)`` alternates, starting from
``R = W`` (``W: (out, in)`` in float32)::

    Q = dequant(quant(R))            # NF4 (bits=4) or int8 (bits=8): peftkit.ops.quant
    B @ A = rank-r SVD truncation of (W - Q),   B = U_r sqrt(S_r): (out, r),  A = sqrt(S_r) V_r^T: (r, in)
    R = W - B @ A                    # the next iteration quantizes this

``loftq_iter`` times, then replaces the base weight by ``Q`` (still a float tensor: save the model and quantize it
when loading) and sets ``lora_A = A``, ``lora_B = B``. As in the reference the factors ignore ``scaling``, so
``Q + scaling * B @ A`` is closest to ``W`` with ``lora_alpha == r``.

:func:`replace_lora_weights_loftq` does one such step for a model already loaded in bitsandbytes 4-bit: ``Q`` is the
layer's own 4-bit weight and ``W`` is read from the model's ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import nn

from ...errors import ConfigError
from ...ops.quant import quant_roundtrip


@dataclass
class LoftQConfig:
    """The reference's ``LoftQConfig``: ``loftq_bits`` (4: NF4, 8: int8) and ``loftq_iter`` (alternating steps,
    >= 1). ``LoraConfig(loftq_config=...)`` stores it as a plain dict (``{"loftq_bits": 4, "loftq_iter": 1}``)."""

    loftq_bits: int = 4
    loftq_iter: int = 1


class LoftQInit(str):
    """``init_lora_weights="loftq"`` resolved with its config, as the layers receive it: the string ``"loftq"``
    (so code that passes ``init_lora_weights`` along is unchanged) carrying ``bits`` and ``iters``."""

    bits: int
    iters: int

    def __new__(cls, bits: int, iters: int) -> Self:
        value = super().__new__(cls, "loftq")
        value.bits, value.iters = bits, iters
        return value


def check_loftq_config(value: object) -> dict[str, Any]:
    """``loftq_config`` (a :class:`LoftQConfig` or a dict with ``loftq_bits`` / ``loftq_iter``) as a dict.

    Raises:
        ConfigError: an unknown key, ``loftq_bits`` not 4 or 8, or ``loftq_iter`` not an int >= 1.
    """
    data = vars(value).copy() if isinstance(value, LoftQConfig) else value
    allowed = "allowed: a LoftQConfig or a dict {'loftq_bits': 4 or 8, 'loftq_iter': an int >= 1}"
    if not isinstance(data, dict) or set(data) - {"loftq_bits", "loftq_iter"}:
        raise ConfigError("loftq_config", value, allowed)
    data = {**vars(LoftQConfig()), **data}
    bits, iters = data["loftq_bits"], data["loftq_iter"]
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ConfigError("loftq_config['loftq_bits']", bits, "allowed: 4 (NF4) or 8 (int8)")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ConfigError("loftq_config['loftq_iter']", iters, "allowed: an int >= 1")
    return data


def _low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S_r) V_r^T: (r, in)`` and ``B = U_r sqrt(S_r): (out, r)`` from the SVD of ``residual: (out, in)``."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:r])
    return root[:, None] * Vh[:r], U[:, :r] * root


def loftq_factors(weight: torch.Tensor, r: int, bits: int, iters: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r), Q: (out, in))`` of LoftQ for ``weight: (out, in)`` (float32), see the module."""
    residual = weight
    for step in range(iters):
        quantized = quant_roundtrip(residual, bits)
        A, B = _low_rank(weight - quantized, r)
        if step + 1 < iters:
            residual = weight - B @ A
    return A, B, quantized


def _safetensors_reader(model_path: str) -> Callable[[str], torch.Tensor]:
    """``name -> tensor`` over ``model_path`` (a ``model.safetensors`` file, or a directory holding one or a
    sharded ``model.safetensors.index.json``)."""
    from safetensors import safe_open

    path = model_path if model_path.endswith(".safetensors") else os.path.join(model_path, "model.safetensors")
    if os.path.exists(path):
        files = None
    else:
        index = os.path.join(os.path.dirname(path), "model.safetensors.index.json")
        if not os.path.exists(index):
            raise FileNotFoundError(f"no model.safetensors (or sharded index) under {model_path!r}: "
                                    "replace_lora_weights_loftq reads the unquantized weights from it")
        with open(index, encoding="utf-8") as handle:
            files = {k: os.path.join(os.path.dirname(index), v) for k, v in json.load(handle)["weight_map"].items()}

    def read(name: str) -> torch.Tensor:
        with safe_open(files[name] if files else path, framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    return read


def _model_path(peft_model: nn.Module, model_path: str | None) -> str:
    if model_path is not None:
        return model_path
    name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    if name and os.path.isdir(name):
        return name
    if name:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(name, local_files_only=True)
        except Exception as exc:  # not in the local cache (or not a Hub id): the user must say where it is
            raise ValueError(f"could not find the safetensors file of {name!r} locally; pass model_path") from exc
    raise ValueError("the model has no config._name_or_path; pass model_path (the model's safetensors file or "
                     "directory)")


def _lookup(read: Callable[[str], torch.Tensor], name: str, prefix: str | None) -> torch.Tensor:
    """The checkpoint tensor ``name``, trying it also without the model's ``base_model_prefix`` (as the reference)."""
    try:
        return read(name)
    except Exception:
        if prefix and name.startswith(prefix + "."):
            return read(name[len(prefix) + 1:])
        raise


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | None = None, adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> None:
    """Set ``lora_A`` / ``lora_B`` of every bitsandbytes 4-bit LoRA layer of ``peft_model`` to the rank-``r`` SVD
    of ``W - dequant(Q)`` (one LoftQ step: ``A = sqrt(S_r) V_r^T``, ``B = U_r sqrt(S_r)``), with ``W`` the
    unquantized weight read from ``model_path``'s safetensors (default: the base model's ``_name_or_path``, a local
    directory or the local Hub cache) and ``Q`` the layer's 4-bit weight.

    ``callback(peft_model, module_name) -> bool`` is called after each layer; False restores that layer's previous
    factors (as the reference: e.g. keep a layer only if the logits got closer to the unquantized model's).

    Raises:
        ValueError: no 4-bit LoRA layer in the model, or the safetensors file cannot be found.
    """
    from .quantized import QuantLinear

    read = _safetensors_reader(_model_path(peft_model, model_path))
    base = peft_model.get_base_model()
    prefix = getattr(base, "base_model_prefix", None)
    found = False
    for name, module in base.named_modules():
        if (not isinstance(module, QuantLinear) or adapter_name not in module.lora_A
                or module.quantization_backend != "bnb 4bit"):
            continue
        found = True
        dense = module._weight_out_in()  # the dequantized 4-bit weight, (out, in) float32
        weight = _lookup(read, f"{name}.weight", prefix).to(device=dense.device, dtype=torch.float32)
        A, B = _low_rank(weight - dense, module.r[adapter_name])
        before = module.lora_A[adapter_name].weight.detach().clone(), module.lora_B[adapter_name].weight.detach().clone()
        _set_factors(module, adapter_name, A, B)
        if callback is not None and not callback(peft_model, name):
            _set_factors(module, adapter_name, *before)
    if not found:
        raise ValueError("replace_lora_weights_loftq: no LoRA layer on a bitsandbytes 4-bit Linear4bit found for "
                         f"adapter {adapter_name!r}; load the model with BitsAndBytesConfig(load_in_4bit=True)")


def _set_factors(module: nn.Module, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    for holder, value in ((module.lora_A[adapter_name], A), (module.lora_B[adapter_name], B)):
        holder.weight.copy_(value.to(holder.weight.dtype))
