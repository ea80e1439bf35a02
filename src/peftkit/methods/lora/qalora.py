"""QALoRA (``LoraConfig.use_qalora``, ``qalora_group_size``): what peftkit does with it, and why it is plain LoRA.

In the reference (🤗 PEFT 0.21.2) QALoRA exists only for GPTQ-quantized linears (``lora.gptq.GPTQLoraLinear`` with
``QALoraLinearVariant``, which needs ``gptqmodel`` and its CUDA kernels). There, for ``x: (..., in)``,
``g = qalora_group_size`` and ``lora_A: (r, in / g)``,

    y = base(x) + scaling * (pool_g(x) * (in / g)) @ A.T @ B.T,

``pool_g`` averaging consecutive groups of ``g`` input features, and the adapter cannot be merged. On every other
layer kind (``nn.Linear``, Conv1D, bitsandbytes, torchao, ...) the reference ignores ``use_qalora``: the layer gets
plain LoRA with ``lora_A: (r, in)``. peftkit adapts no GPTQ layers (their kernels cannot be built or tested here), so
``use_qalora=True`` gives exactly what the reference gives the layers peftkit adapts -- plain LoRA, same keys,
shapes and outputs, mergeable -- and warns once at construction that QALoRA itself is not applied. There is
therefore no QALoRA :class:`~.variants.LoraVariant` in peftkit: one would be unreachable code.
"""

from __future__ import annotations

import warnings
from typing import Any

from ...config import check, is_int
from ...errors import PeftWarning


def check_qalora(config: Any) -> None:
    """Validate ``qalora_group_size`` (an int >= 1, read only when ``use_qalora=True``, as the reference) and warn
    that ``use_qalora=True`` leaves the adapted layers plain LoRA (see the module doc). Raises
    :class:`~peftkit.errors.ConfigError` (a ``ValueError``) naming ``qalora_group_size``."""
    if not config.use_qalora:
        return
    size = config.qalora_group_size
    check(is_int(size) and size >= 1, "qalora_group_size", size, "allowed: an int >= 1 (used with use_qalora=True)")
    warnings.warn("use_qalora=True: the reference applies QALoRA only to GPTQ-quantized linear layers, which peftkit "
                  "does not adapt; the targeted layers get plain LoRA, as the reference gives them",
                  PeftWarning, stacklevel=5)
