"""Merging into quantized layers as an explicit policy: dequantize, add the update, re-quantize, and measure.

Each merge into a quantized layer records how much the re-quantization changed what the layer computes: the
max abs difference between the layer's output with the adapter applied on top (before merging) and the output of
the merged, re-quantized layer, on a fixed probe batch. The tuner gathers the records of one merge call into a
:class:`QuantizedMergeReport`, emits it as a :class:`QuantizedMergeWarning` (the report is ``warning.report``) and
keeps it as ``merge_report`` on the tuner. ``merge_and_unload(dequantize=True)`` avoids the rounding entirely by
returning plain ``nn.Linear`` layers in full precision (:func:`dequantize_linears`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PeftWarning
from .backends import backend_of

#: rows of the probe batch a merge is measured on
PROBE_ROWS = 16


class QuantizedMergeWarning(PeftWarning):
    """Emitted after merging into quantized layers; ``.report`` is the :class:`QuantizedMergeReport`.

    Built as ``QuantizedMergeWarning(report)``; a plain message string is accepted too (``report`` is then None), so
    that the warning can be rebuilt from its message, as ``warnings`` machinery and pytest-xdist do."""

    def __init__(self, report: QuantizedMergeReport | str) -> None:
        self.report = None if isinstance(report, str) else report
        super().__init__(report if isinstance(report, str) else report.summary())


@dataclass(frozen=True)
class QuantizedMergeRecord:
    """One adapter merged into one quantized layer.

    ``output_error``: max abs difference, on a probe batch ``x ~ N(0, 1)`` of shape ``(16, in)``, between the
    layer's eval-mode output before the merge (quantized base + the layer's other active adapters + this adapter)
    and after it (re-quantized merged weight + the same other adapters).
    ``weight_error``: max abs difference between the intended merged weight ``W_deq + ΔW`` and the weight read back
    after re-quantization.
    """

    layer: str
    adapter: str
    backend: str
    output_error: float
    weight_error: float


@dataclass
class QuantizedMergeReport:
    """Every :class:`QuantizedMergeRecord` of one merge call."""

    records: list[QuantizedMergeRecord] = field(default_factory=list)

    @property
    def max_output_error(self) -> float:
        """Largest ``output_error`` over the merged layers (0.0 when nothing quantized was merged)."""
        return max((r.output_error for r in self.records), default=0.0)

    @property
    def max_weight_error(self) -> float:
        """Largest ``weight_error`` over the merged layers."""
        return max((r.weight_error for r in self.records), default=0.0)

    @property
    def backends(self) -> list[str]:
        return sorted({r.backend for r in self.records})

    def summary(self) -> str:
        worst = max(self.records, key=lambda r: r.output_error)
        adapters = sorted({r.adapter for r in self.records})
        return (
            f"merged adapter(s) {adapters} into {len(self.records)} quantized layer(s) ({', '.join(self.backends)}) "
            f"by dequantize -> add -> re-quantize; rounding changes the layer outputs by up to "
            f"{self.max_output_error:.3g} (max abs on a probe batch; worst layer {worst.layer!r}) and the weights by "
            f"up to {self.max_weight_error:.3g}. Generations may differ slightly; merge_and_unload(dequantize=True) "
            "returns an exactly merged full-precision model instead"
        )


def _probe(module: nn.Module, in_features: int) -> torch.Tensor:
    """A fixed probe batch ``(16, in)`` (its own generator: the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(PROBE_ROWS, in_features, generator=gen).to(module.weight.device)


@torch.no_grad()
def _eval_output(layer: nn.Module, x: torch.Tensor, also: str | None = None) -> torch.Tensor:
    """``layer(x)`` in eval mode with its adapters enabled, one adapter per row routing off, and adapter ``also``
    applied too when it is not merged (so "before" includes the adapter being merged even if it is inactive)."""
    saved = (layer.training, layer._disable_adapters, layer._row_adapters, layer._forward_adapters)
    layer.eval()
    layer._disable_adapters, layer._row_adapters = False, None
    if also is not None and also not in layer._forward_adapters and also not in layer.merged_adapters:
        layer._forward_adapters = (*layer._forward_adapters, also)
    try:
        return layer(x).float()
    finally:
        layer.train(saved[0])
        layer._disable_adapters, layer._row_adapters, layer._forward_adapters = saved[1:]


@contextmanager
def measured_requantization(layer: nn.Module, adapter: str, target: torch.Tensor
                            ) -> Iterator[None]:
    """Measure the merge of ``adapter`` into ``layer`` (an adapter layer over a quantized linear) done inside the
    block; ``target: (out, in)`` is the dense merged weight the block writes. The record is appended to
    ``layer.quant_merge_records``. Does nothing for plain base layers."""
    base = layer.get_base_layer()
    backend = backend_of(base)
    if backend is None:
        yield
        return
    x = _probe(base, target.shape[1])
    before = _eval_output(layer, x, also=adapter)
    yield
    after = _eval_output(layer, x)
    weight_error = (backend.dequantize(base) - target.float().to(base.weight.device)).abs().max().item()
    record = QuantizedMergeRecord(layer="", adapter=adapter, backend=backend.name,
                                  output_error=(after - before).abs().max().item(), weight_error=weight_error)
    layer.__dict__.setdefault("quant_merge_records", []).append(record)


def collect_merge_report(named_layers: list[tuple[str, nn.Module]]) -> QuantizedMergeReport | None:
    """Take the records the layers accumulated (clearing them) into one report; None when there are none."""
    report = QuantizedMergeReport()
    for name, layer in named_layers:
        records = layer.__dict__.pop("quant_merge_records", None) or []
        report.records.extend(QuantizedMergeRecord(name, r.adapter, r.backend, r.output_error, r.weight_error)
                              for r in records)
    return report if report.records else None


def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` computing what quantized ``module`` computes, with the dequantized weight in ``dtype``
    (the bias keeps its values, cast to ``dtype``)."""
    weight = backend_of(module).dequantize(module)  # type: ignore[union-attr]
    bias = module.bias
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    return linear.to(weight.device)


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized linear of ``model`` by :func:`dequantized_linear`; return how many were replaced.
    Clears the transformers flags that mark the model as quantized."""
    targets = [(name, module) for name, module in model.named_modules() if backend_of(module) is not None]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantized_linear(module, dtype))
    if targets:
        _clear_quantized_flags(model)
    return len(targets)


def _clear_quantized_flags(model: nn.Module) -> None:
    """A transformers model loaded quantized carries flags that stop ``save_pretrained`` / Trainer from treating it
    as a normal model; they no longer hold once every quantized layer is dense."""
    for attr in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"):
        if attr in model.__dict__:
            model.__dict__[attr] = False
    if "quantization_method" in model.__dict__:
        del model.__dict__["quantization_method"]
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
