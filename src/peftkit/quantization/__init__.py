"""Quantized base layers (bitsandbytes 8-bit / 4-bit, torchao int8): detection, dense weights, re-quantization,
measured merges and training preparation. bitsandbytes and torchao are imported only when a layer of theirs is
met (they are never imported by ``import peftkit``)."""

from __future__ import annotations

from .backends import (
    QuantBackend,
    backend_of,
    check_requantizable,
    dense_weight,
    is_quantized,
    register_backend,
    write_dense_weight,
)
from .merge import (
    QuantizedMergeRecord,
    QuantizedMergeReport,
    QuantizedMergeWarning,
    collect_merge_report,
    dequantize_linears,
    dequantized_linear,
    measured_requantization,
)
from .training import is_kbit_model, make_quantized_layers_trainable, prepare_model_for_kbit_training

__all__ = [
    "QuantBackend",
    "QuantizedMergeRecord",
    "QuantizedMergeReport",
    "QuantizedMergeWarning",
    "backend_of",
    "check_requantizable",
    "collect_merge_report",
    "dense_weight",
    "dequantize_linears",
    "dequantized_linear",
    "is_kbit_model",
    "is_quantized",
    "make_quantized_layers_trainable",
    "measured_requantization",
    "prepare_model_for_kbit_training",
    "register_backend",
    "write_dense_weight",
]
