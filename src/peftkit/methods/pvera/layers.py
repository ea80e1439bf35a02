"""PVeRA layers: VeRA's shared random projections with a sampled (reparametrised) hidden vector.

Shapes: the shared projections ``A: (2r, max_in)`` and ``B: (max_out, r)`` (:class:`PveraProjections`, one object per
model, referenced by every layer: VeRA's :class:`~peftkit.methods.vera.layers.VeraProjections` with twice the rows
of ``A``); per layer and adapter ``pvera_lambda_d: (2r,)`` and ``pvera_lambda_b: (out,)``. A layer with
``W: (out, in)`` uses ``A[:, :in]`` and ``B[:out]``: ``[μ, log σ²] = λ_d ⊙ (A x)``, ``z = μ + ε ⊙ exp(log σ² / 2)``
(sampling: training, or ``sample_at_inference``) else ``z = μ``, and ``y = base(x) + (λ_b ⊙ B) z``. The update is
added into the base output in place with one ``addmm_`` (the reference makes an ``(N, out)`` product, a scaled copy
and a sum, and keeps the product for backward); outside sampling only the mean half of ``A`` is multiplied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.dispatch import inplace_safe
from ...layers.quant_merge import AdditiveQuantizedMerge
from ...ops.lora_fused import addmm_into_
from ...ops.lowrank import can_update_inplace
from ...quantization import backend_of
from ..vera.layers import VeraProjections, kaiming_uniform_seeded


def generate_pvera_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A: (2r, max_in), B: (max_out, r))`` from a CPU generator seeded with ``seed``, ``A`` first (the
    reference's ``kaiming_uniform_`` draws, bit-exact)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return kaiming_uniform_seeded((2 * r, max_in), generator), kaiming_uniform_seeded((max_out, r), generator)


class PveraProjections(VeraProjections):
    """VeRA's shared projections object with ``A: (2r, max_in)``; ``pvera_A`` / ``pvera_B`` are the reference's
    (checkpoint) names of ``vera_A`` / ``vera_B``."""

    generate = staticmethod(generate_pvera_projections)

    @property
    def pvera_A(self) -> torch.Tensor:
        return self.vera_A

    @property
    def pvera_B(self) -> torch.Tensor:
        return self.vera_B


#: the per-adapter generators, by key, for :func:`_seeded_normal` (dynamo cannot trace a ``torch.Generator``
_GENERATORS: dict[int, torch.Generator] = {}


def generator_key(generator: torch.Generator) -> int:
    """A key of ``generator`` for :func:`_seeded_normal` (registered once; generators are a few bytes each)."""
    key = id(generator)
    if _GENERATORS.get(key) is not generator:
        _GENERATORS[key] = generator
    return key


def _normal_from(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``N(0, 1)`` of ``like``'s shape and dtype drawn from the CPU ``generator``, then moved to ``like``'s device."""
    return torch.randn(like.shape, dtype=like.dtype, generator=generator).to(like.device)


@torch.library.custom_op("peftkit::pvera_seeded_normal", mutates_args=())
def _seeded_normal(like: torch.Tensor, key: int) -> torch.Tensor:
    """:func:`_normal_from` as one opaque op, so a compiled model draws from the adapter's generator without a
    graph break (the same draws as eager)."""
    return _normal_from(like, _GENERATORS[key])


@_seeded_normal.register_fake
def _(like: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(like)


def reparametrize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | int | None) -> torch.Tensor:
    """``mu + ε ⊙ exp(logvar / 2)`` with ``ε ~ N(0, 1)`` of ``mu``'s shape ``(..., r)``: from ``generator`` (a CPU
    generator: drawn on CPU, then moved) or the global generator (the reference's draws). Under ``torch.compile``
    pass :func:`generator_key` of the generator instead (an int dynamo keeps as a constant)."""
    std = torch.exp(0.5 * logvar)
    if generator is None:
        eps = torch.randn_like(std)
    elif isinstance(generator, int):
        eps = _seeded_normal(std.detach(), generator)
    else:
        eps = _normal_from(std, generator)
    return mu + eps * std


class PveraLayer(AdditiveQuantizedMerge):
    """PVeRA on ``nn.Linear`` (plain or quantized) / transformers ``Conv1D``: ``y = base(x) + λ_b ⊙ (B z)``, ``z`` sampled from
    ``N(μ, σ²)`` with ``[μ, log σ²] = λ_d ⊙ (A dropout(x))`` (or ``z = μ``)."""

    adapter_layer_names = ("pvera_lambda_b", "pvera_lambda_d")
    other_param_names = ("pvera_dropout", "r", "sample_at_inference", "pvera_generator")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        # nn.Linear (also quantized, whose weight is packed): in/out features; Conv1D (fan_in_fan_out): (in, out)
        self.in_features, self.out_features = tuple(base.weight.shape) if fan_in_fan_out else (
            base.in_features, base.out_features)
        self.fan_in_fan_out = fan_in_fan_out
        backend = backend_of(base)
        self.quantization_backend = None if backend is None else backend.name
        self.pvera_lambda_b = nn.ParameterDict({})
        self.pvera_lambda_d = nn.ParameterDict({})
        self.pvera_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.sample_at_inference: dict[str, bool] = {}
        self.pvera_generator: dict[str, torch.Generator | None] = {}
        # bound by the method once all layers exist; VeRA's binding hooks look for this attribute name
        self.vera_projections: PveraProjections | None = None
        self._inplace = inplace_safe(self.get_base_layer())
        self._generator_keys: dict[str, int] = {}  # :func:`generator_key` of each seeded adapter's generator

    def update_layer(self, adapter_name: str, r: int, dropout: float, init_weights: bool, d_initial: float,
                     sample_at_inference: bool, generator_seed: int | None, dtype: torch.dtype | None = None
                     ) -> None:
        """Create adapter ``adapter_name``: ``λ_b = 0`` (identity) and ``λ_d = d_initial`` when ``init_weights``,
        else the reference's ``λ_b = 1``, ``λ_d ~ N(0, 1)`` (``(2r,)``)."""
        device = self.get_base_layer().weight.device
        if init_weights:
            lambda_b = torch.zeros(self.out_features, dtype=dtype, device=device)
            lambda_d = torch.full((2 * r,), float(d_initial), dtype=dtype, device=device)
        else:
            lambda_b = torch.ones(self.out_features, dtype=dtype, device=device)
            lambda_d = torch.randn(2 * r, dtype=dtype).to(device)
        self.pvera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.pvera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self.pvera_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.sample_at_inference[adapter_name] = sample_at_inference
        self.pvera_generator[adapter_name] = (None if generator_seed is None
                                              else torch.Generator().manual_seed(generator_seed))
        if generator_seed is not None:
            self._generator_keys[adapter_name] = generator_key(self.pvera_generator[adapter_name])
        self._refresh()

    # ------------------------------------------------------------------ the reference's attribute names
    @property
    def pvera_A(self) -> dict[str, torch.Tensor]:
        """``{adapter: shared A (2r, max_in)}`` (the reference's per-layer view of the shared buffer)."""
        shared = self.vera_projections
        return {} if shared is None else {name: shared.vera_A for name in self.pvera_lambda_d}

    @property
    def pvera_B(self) -> dict[str, torch.Tensor]:
        """``{adapter: shared B (max_out, r)}``."""
        shared = self.vera_projections
        return {} if shared is None else {name: shared.vera_B for name in self.pvera_lambda_d}

    def projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (2r, in), B: (out, r))`` in the vectors' dtype: views of the shared projections (no copy in the
        projections' own dtype)."""
        shared = self.vera_projections
        if shared is None:
            raise RuntimeError("PVeRA layer has no shared projections bound (the adapter was not injected by peftkit)")
        dtype = self.pvera_lambda_d[adapter_name].dtype
        return shared.vera_A[:, : self.in_features].to(dtype), shared.vera_B[: self.out_features].to(dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (its generator key too)."""
        super().delete_adapter(adapter_name)
        self._generator_keys.pop(adapter_name, None)

    # ------------------------------------------------------------------ forward
    def hidden(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``z: (..., r)`` of adapter ``name`` for ``x: (..., in)``: a sample of ``N(μ, σ²)`` while sampling
        (training or ``sample_at_inference``), else ``μ`` (then only the mean rows of ``A`` are multiplied)."""
        a, _ = self.projections(name)
        lambda_d, r = self.pvera_lambda_d[name], self.r[name]
        h = self.pvera_dropout[name](x).to(lambda_d.dtype)
        if not (self.training or self.sample_at_inference[name]):
            return F.linear(h, a[:r]) * lambda_d[:r]
        mu, logvar = (F.linear(h, a) * lambda_d).chunk(2, dim=-1)
        generator = self.pvera_generator[name]
        if generator is not None and torch.compiler.is_compiling():
            generator = self._generator_keys[name]  # dynamo cannot trace a torch.Generator
        return reparametrize(mu, logvar, generator)

    def _add(self, result: torch.Tensor, name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result: (..., out)`` plus ``z (λ_b ⊙ B)^T`` (one ``addmm_`` into ``result`` when ``inplace``, keeping
        only ``z: (N, r)`` for backward, not the reference's ``(N, out)`` product)."""
        z = self.hidden(name, x)
        _, b = self.projections(name)
        scaled_b = self.pvera_lambda_b[name].unsqueeze(-1) * b  # (out, r)
        # ``nn.Linear`` with a bias returns a view of its 2-D output for 3-D inputs: an in-place write into the view
        # would make autograd clone the whole gradient (CopySlices), so write into the 2-D output and view it again
        if inplace:
            target = result if result._base is None else result._base
            if target.numel() == result.numel() and can_update_inplace(target, scaled_b):
                return addmm_into_(target, z.reshape(-1, z.shape[-1]), scaled_b, 1.0).view(result.shape)
        return (result + F.linear(z, scaled_b)).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``; several active adapters add their updates."""
        return self.forward_adding(x, self._add, self._inplace, *args, **kwargs)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = (λ_b ⊙ B) @ (λ_d[:r] ⊙ A[:r])`` (the mean only): ``(out, in)``, transposed to ``(in, out)`` for
        ``Conv1D``; in the base weight's dtype, float32 for quantized bases (half precision on CPU is computed in
        float32, as the reference)."""
        weight = self.get_base_layer().weight
        dtype = torch.float32 if self.quantization_backend is not None else weight.dtype
        r = self.r[adapter_name]
        with torch.no_grad():
            a, b = self.projections(adapter_name)
            lambda_d, lambda_b = self.pvera_lambda_d[adapter_name][:r], self.pvera_lambda_b[adapter_name]
            if weight.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
                a, b, lambda_d, lambda_b = a.float(), b.float(), lambda_d.float(), lambda_b.float()
            delta = (lambda_b.unsqueeze(-1) * b) @ (lambda_d.unsqueeze(-1) * a[:r])
            if self.fan_in_fan_out:
                delta = delta.t()
        return delta.to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
