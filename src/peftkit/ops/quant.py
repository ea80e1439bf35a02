"""Quantize-then-dequantize round trips used by LoftQ (``init_lora_weights="loftq"``), in plain torch.

They reproduce bitsandbytes' formats exactly, so LoftQ needs neither bitsandbytes nor a GPU:

* NF4 (``bits=4``): the tensor is flattened and cut into blocks of ``blocksize`` (64, bitsandbytes' default) values;
  each block is scaled by its absolute maximum into ``[-1, 1]`` and every value is replaced by the nearest of the 16
  NF4 levels (:data:`NF4_CODE`; a value exactly between two levels takes the lower one, as ``torch.bucketize`` in
  bitsandbytes' ``quantize_4bit``). The last block may be shorter.
* int8 (``bits=8``): LLM.int8's row-wise scheme on the float16-rounded weight, ``q = round(w * 127 / absmax(row))``,
  ``w ≈ q * absmax / 127``.

Every function maps ``w: (out, in)`` (any float dtype) to the dequantized ``(out, in)`` tensor in float32.
"""

from __future__ import annotations

import torch

#: the 16 NF4 levels (normal-float quantiles normalised to [-1, 1]), bitsandbytes' ``_NF4_QUANT_TABLE``
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _blocks(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` flattened to float32 and the per-value absmax of its block: two ``(numel,)`` tensors."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1).repeat_interleave(blocksize)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().expand(n - full)])
    return flat, absmax


def nf4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``w: (out, in)`` quantized to NF4 with per-block absmax and dequantized, ``(out, in)`` float32.

    Nearest level through the midpoints between consecutive levels (``torch.bucketize``), as bitsandbytes does."""
    flat, absmax = _blocks(w, blocksize)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    scaled = torch.clamp(flat * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    return (code[index] * absmax).reshape(w.shape)


def nf4_roundtrip_reference(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Plain reference of :func:`nf4_roundtrip`: a Python loop over blocks, nearest level by ``argmin`` of the
    distance (ties to the lower level, like the midpoint search). For tests."""
    flat = w.reshape(-1).double()
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        absmax = block.abs().max().clamp(min=1e-38)
        index = (block[:, None] / absmax - code[None, :]).abs().argmin(dim=1)
        out[start:start + blocksize] = code[index] * absmax
    return out.reshape(w.shape).float()


def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``w: (out, in)`` quantized to int8 per row (absmax scaling) and dequantized, ``(out, in)`` float32.

    As bitsandbytes' ``Int8Params``, the weight is first rounded to float16 (so are the row scales)."""
    half = w.to(torch.float16)
    absmax = half.abs().amax(dim=1, keepdim=True).float()
    q = torch.round(half * (127.0 / absmax)).to(torch.int8)
    return q * absmax * 7.874015718698502e-3  # 1 / 127, bitsandbytes' constant


def quant_roundtrip(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`nf4_roundtrip` for ``bits=4``, :func:`int8_roundtrip` for ``bits=8``."""
    return nf4_roundtrip(w) if bits == 4 else int8_roundtrip(w)
