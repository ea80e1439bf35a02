"""bitsandbytes backends: ``bnb.nn.Linear8bitLt`` (``Int8Params``) and ``bnb.nn.Linear4bit`` (``Params4bit``).

8-bit: ``W ≈ CB * SCB / 127`` row-wise (``CB: (out, in)`` int8, ``SCB: (out,)``). 4-bit: blockwise nf4/fp4 codes
packed two per byte with per-block absmax (optionally itself quantized: double quantization).

CPU trap (bitsandbytes 0.50): ``Linear4bit.forward`` in eval mode without grad, on a CPU with AVX512-BF16, repacks
the weight into an inference-only layout (``quant_state.packing_format_for_cpu``); later forwards go through a kernel
that autograd cannot differentiate, so adapter gradients silently become None. :meth:`Bnb4bitBackend.prepare`
undoes a repack and turns it off for the module (``support_avx512bf16_for_cpu = False``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import MergeError


def _bnb_class(name: str) -> type | None:
    modules = sys.modules.get("bitsandbytes.nn.modules")
    return getattr(modules, name, None)


class Bnb8bitBackend:
    """LLM.int8() linears (``has_fp16_weights=False``: the weight is stored as int8 with row scales)."""

    name = "bnb 8bit"

    def matches(self, module: nn.Module) -> bool:
        cls = _bnb_class("Linear8bitLt")
        return cls is not None and isinstance(module, cls) and module.weight.dtype == torch.int8

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = module.weight
        scales = weight.SCB if weight.SCB is not None else module.state.SCB
        if scales is None:
            raise MergeError(f"bnb 8bit: layer {type(module).__name__} has no row scales (SCB); cannot dequantize it")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        fresh = bnb.nn.Int8Params(weight.to("cpu", torch.float32), requires_grad=False,
                                  has_fp16_weights=old.has_fp16_weights)
        module.weight = fresh.to(old.device)
        module.state.reset_grads()
        module.state.SCB = None  # read again from the new weight on the next forward

    def cannot_requantize(self, module: nn.Module) -> str | None:
        return None

    def prepare(self, module: nn.Module) -> None:
        """Nothing to do: 8-bit layers train through on CPU."""


class Bnb4bitBackend:
    """QLoRA 4-bit linears (nf4 / fp4, any blocksize, double quantization, any compute dtype)."""

    name = "bnb 4bit"

    def matches(self, module: nn.Module) -> bool:
        cls = _bnb_class("Linear4bit")
        return cls is not None and isinstance(module, cls) and getattr(module.weight, "quant_state", None) is not None

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        unpack_cpu_inference_layout(module)
        weight = module.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        unpack_cpu_inference_layout(module)
        old = module.weight
        fresh = bnb.nn.Params4bit(
            weight.to("cpu", torch.float32),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
            bnb_quantized=False,
        )
        module.weight = fresh.to(old.device)

    def cannot_requantize(self, module: nn.Module) -> str | None:
        return None

    def prepare(self, module: nn.Module) -> None:
        unpack_cpu_inference_layout(module)
        module.support_avx512bf16_for_cpu = False


def unpack_cpu_inference_layout(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repacking of a ``Linear4bit`` weight; True when it was repacked."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return True
