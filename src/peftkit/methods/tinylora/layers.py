"""TinyLoRA layers on ``nn.Linear``, transformers' GPT-2 ``Conv1D`` and ``nn.Embedding``.

Per adapter a layer holds frozen buffers ``tinylora_A: (r, in)`` and ``tinylora_B: (out, r)`` (the truncated SVD
of its base weight ``W: (out, in)``, ``sqrt(S)`` on both sides; for an embedding ``W: (num_embeddings, dim)``) and
the frozen projection ``tinylora_P: (u, r, r)``; the trained vector ``tinylora_v: (u,)`` is held once per weight
tying group by the tuner (:class:`TinyLoraVectors`) and referenced, not registered, here.
``R = Σ_i v[i] P[i]: (r, r)`` and ``ΔW = B @ R @ A``. Forward (linear): ``y = base(x) + ((dropout(x) @ A.T) @ R.T)
@ B.T``; (embedding): ``y = base(ids) + (dropout(B[ids]) @ R) @ A``, the last product added into the base output in
place where autograd allows (``ops.lowrank.add_lowrank_``): no dense ``ΔW`` and only ``(..., r)`` temporaries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedModuleError
from ...layers.base import AdapterLayer
from ...layers.buffers import BufferDict
from ...layers.dispatch import EMBEDDING, HF_CONV1D, LINEAR, inplace_safe, module_kind
from ...ops.lowrank import add_lowrank_, lowrank_update_reference
from .config import TinyLoraConfig

#: the module kinds TinyLoRA wraps (the reference: ``nn.Linear``, ``Conv1D`` and ``nn.Embedding``)
TINYLORA_KINDS = (LINEAR, HF_CONV1D, EMBEDDING)


class TinyLoraVectors(nn.ModuleDict):
    """The tuner's ``tinylora_v``: ``self[adapter_name][group] -> v: (u,)`` (the reference's layout, in memory
    ``base_model.tinylora_v.<adapter>.<group>``), one vector per weight tying group (``"0"``, ``"1"``, ...) held once
    however many layers share it; saved without the adapter name, ``base_model.tinylora_v.<group>``, by the
    method's ``export_state`` / ``convert_checkpoint``."""

    def drop(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``'s vectors."""
        if adapter_name in self:
            del self[adapter_name]


def add_lowrank_unviewed_(result: torch.Tensor, h: torch.Tensor, M: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """``result += (h @ M.T) @ N.T`` in place for ``result: (..., out)``, ``h: (..., k)``, ``M: (r, k)``,
    ``N: (out, r)``: :func:`~peftkit.ops.lowrank.add_lowrank_` (written into ``result`` itself, not a view)."""
    return add_lowrank_(result, h, M, N, 1.0)


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A: (r', in), B: (out, r'))`` with ``B @ A`` the best rank-``r'`` approximation of ``weight: (out, in)``,
    ``r' = min(r, out, in)``: ``A = sqrt(S) V^T``, ``B = U sqrt(S)`` (SVD in float32, factors in ``weight``'s
    dtype; the reference's rounding order)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rank = min(r, *weight.shape)
    root = S[:rank].to(weight.dtype).sqrt()
    A = root.unsqueeze(1) * Vh[:rank].to(weight.dtype)
    B = U[:, :rank].to(weight.dtype) * root.unsqueeze(0)
    return A.contiguous(), B.contiguous()


def projection(u: int, r: int, seed: int) -> torch.Tensor:
    """``P: (u, r, r)`` float32 from ``N(0, 1/r)`` drawn by a CPU generator seeded with ``seed`` (bit-exact with the
    reference, so ``save_projection=False`` files regenerate the same tensors)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=generator)


class TinyLoraLayer(AdapterLayer):
    """TinyLoRA on a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``, weight stored ``(in, out)``) or an embedding."""

    adapter_layer_names = ("tinylora_A", "tinylora_B", "tinylora_P")
    other_param_names = ("r", "u", "tinylora_dropout", "_v_key", "_v_dtype", "_save_projection")

    def __init__(self, base_layer: nn.Module, kind: str, layer_idx: int) -> None:
        super().__init__(base_layer)
        self.tinylora_A = BufferDict()  # (r, in) per adapter
        self.tinylora_B = BufferDict()  # (out, r) per adapter
        self.tinylora_P = BufferDict()  # (u, r, r) per adapter
        self.tinylora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.u: dict[str, int] = {}
        self._v_key: dict[str, str] = {}  # the adapter's weight tying group
        self._v_dtype: dict[str, torch.dtype] = {}  # the dtype of the adapter's v (the adapter dtype)
        self._save_projection: dict[str, bool] = {}
        self.kind = kind
        self.fan_in_fan_out = kind == HF_CONV1D
        weight = self.get_base_layer().weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        # the projection seed offset: the layer's index among the targets of the adapter that created it (the
        # reference keeps it for later adapters too)
        self._layer_idx = layer_idx
        vars(self)["_vectors"] = None  # the tuner's TinyLoraVectors: a plain attribute, so v is not registered here

    @property
    def tinylora_v(self) -> TinyLoraVectors | None:
        """The model's trained vectors, ``{adapter_name: {group: (u,)}}``."""
        return vars(self)["_vectors"]

    def attach_vectors(self, vectors: TinyLoraVectors) -> None:
        """Reference the tuner's vector holder (one ``v`` per group for the whole model)."""
        vars(self)["_vectors"] = vectors

    def update_layer(self, adapter_name: str, config: TinyLoraConfig, v_key: str, dtype: torch.dtype) -> None:
        """Create adapter ``adapter_name``: SVD factors of the base weight, ``P`` seeded by ``projection_seed +
        layer index``, all in the base weight's dtype; ``v`` (in ``dtype``) comes from the tuner's ``shared_state``
        hook."""
        weight = self.get_base_layer().weight.detach()
        A, B = svd_factors(weight.t() if self.fan_in_fan_out else weight, config.r)
        rank = A.shape[0]
        P = projection(config.u, rank, config.projection_seed + self._layer_idx)
        self.tinylora_A[adapter_name], self.tinylora_B[adapter_name] = A, B
        self.tinylora_P[adapter_name] = P.to(weight.device, weight.dtype if weight.is_floating_point() else None)
        p = config.tinylora_dropout
        self.tinylora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        self.r[adapter_name], self.u[adapter_name] = rank, config.u
        self._v_key[adapter_name], self._v_dtype[adapter_name] = v_key, dtype
        self._save_projection[adapter_name] = config.save_projection
        self._refresh()

    def vector(self, adapter_name: str) -> nn.Parameter:
        """Adapter ``adapter_name``'s trained ``v: (u,)`` (shared by its weight tying group)."""
        return vars(self)["_vectors"][adapter_name][self._v_key[adapter_name]]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The adapter's only trained tensor, its group's ``v`` (the buffers A, B, P are frozen)."""
        vectors = vars(self)["_vectors"]
        key = self._v_key.get(adapter_name)
        if vectors is None or adapter_name not in vectors or key not in vectors[adapter_name]:
            return []
        return [vectors[adapter_name][key]]

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``tinylora_A`` / ``tinylora_B`` (and ``tinylora_P`` with ``save_projection``) under the reference's keys;
        ``v`` is saved once per group by the method's ``export_state``."""
        state = super().adapter_state(adapter_name)
        if not self._save_projection.get(adapter_name, True):
            state.pop("tinylora_P", None)
        return state

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter here and its vectors from the tuner's holder."""
        super().delete_adapter(adapter_name)
        vectors = vars(self)["_vectors"]
        if vectors is not None:
            vectors.drop(adapter_name)

    # ------------------------------------------------------------------ the update
    def projection_R(self, adapter_name: str) -> torch.Tensor:
        """``R = Σ_i v[i] P[i]: (r, r)`` in ``v``'s dtype (differentiable in ``v``)."""
        v, P = self.vector(adapter_name), self.tinylora_P[adapter_name]
        r = P.shape[-1]
        return (v @ P.reshape(P.shape[0], r * r).to(v)).reshape(r, r)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = B @ R @ A`` in the base weight's layout (transposed for ``Conv1D``) and dtype; computed in float32
        for half-precision factors on CPU."""
        A, B = self.tinylora_A[adapter_name], self.tinylora_B[adapter_name]
        R = self.projection_R(adapter_name)
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        delta = B @ R.to(A) @ A
        return (delta.t() if self.fan_in_fan_out else delta).to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """TinyLoRA's effect is ``W + B R A``, a rank-``r`` update."""
        return True

    def _factors(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h: (..., r), M: (r, r), N: (out, r))`` with the update ``(h @ M.T) @ N.T``: linear ``h = dropout(x)
        @ A.T``, ``M = R``, ``N = B``; embedding ``h = dropout(B[ids])``, ``M = R.T``, ``N = A.T``."""
        A, B = self.tinylora_A[name], self.tinylora_B[name]
        R = self.projection_R(name).to(A.dtype)
        if self.kind == EMBEDDING:
            return self.tinylora_dropout[name](F.embedding(x, B)), R.t(), A.t()
        return F.linear(self.tinylora_dropout[name](x).to(A.dtype), A), R, B

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in)`` (or token ids) ``-> (..., out)``: the base output plus each active adapter's update."""
        if self._row_adapters is not None and not self._disable_adapters:  # token ids: rows by their own shape
            return self.mixed_add(x, self.base_layer(x, *args, **kwargs), self._delta)
        return self.forward_adding(x, self._add, inplace_safe(self.base_layer), *args, **kwargs)

    def _add(self, result: torch.Tensor, name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result: (..., out)`` plus adapter ``name``'s update on ``x`` (written into ``result`` when ``inplace``)."""
        h, M, N = self._factors(name, x)
        return add_lowrank_unviewed_(result, h, M, N) if inplace else lowrank_update_reference(result, h, M, N, 1.0)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s update alone on ``x`` (mixed batches)."""
        h, M, N = self._factors(name, x)
        return F.linear(F.linear(h, M), N)


def layer_options(name: str, module: nn.Module, config: Any) -> dict[str, Any]:
    """Per-layer facts: the kind and ``fan_in_fan_out`` (True exactly for ``Conv1D``: the reference corrects the
    config so); refuses other module types."""
    kind = module_kind(module)
    if kind not in TINYLORA_KINDS:
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(module).__name__}; TinyLoRA supports torch.nn.Linear, "
            "torch.nn.Embedding and transformers.pytorch_utils.Conv1D only. Adjust target_modules.")
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def plan_options(config: Any, planned: list[tuple[str, nn.Module, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each planned layer's index (model order) and weight tying group, the reference's arithmetic:
    ``groups = max(1, round(n (1 - weight_tying)))``, ``size = max(1, n // groups)``, group
    ``min(index // size, groups - 1)``."""
    assert isinstance(config, TinyLoraConfig)
    n = len(planned)
    groups = max(1, round(n * (1.0 - config.weight_tying)))
    size = max(1, n // groups)
    return [{**options, "layer_idx": i, "v_key": str(min(i // size, groups - 1))}
            for i, (_, _, options) in enumerate(planned)]


def create_layer(module: nn.Module, options: dict[str, Any], config: Any, adapter_name: str,
                 dtype: torch.dtype) -> TinyLoraLayer:
    """Wrap ``module`` (or reuse its TinyLoRA layer) and add adapter ``adapter_name``'s buffers; the tuner's
    ``shared_state`` hook then creates the vectors (in ``dtype``) and hands them to the layer."""
    assert isinstance(config, TinyLoraConfig)
    layer = module if isinstance(module, TinyLoraLayer) else TinyLoraLayer(module, options["kind"],
                                                                           options["layer_idx"])
    layer.update_layer(adapter_name, config, options["v_key"], dtype)
    return layer


def attach_vectors(tuner: nn.Module, config: Any, adapter_name: str, layers: list[nn.Module]) -> None:
    """``MethodSpec.shared_state``: create adapter ``adapter_name``'s vectors ``v: (u,)``, one per weight tying
    group in group order (zeros for ``init_weights=True``, ``U(-init_v_bound, init_v_bound)`` for ``"uniform"``,
    uninitialised for False), in the tuner's ``tinylora_v`` holder (the reference's attribute), and reference the
    holder from ``layers``."""
    assert isinstance(config, TinyLoraConfig)
    vectors = getattr(tuner, "tinylora_v", None)
    if not isinstance(vectors, TinyLoraVectors):
        vectors = TinyLoraVectors()
        tuner.tinylora_v = vectors
    holder = vectors[adapter_name] = nn.ParameterDict()
    ours = [layer for layer in layers if isinstance(layer, TinyLoraLayer) and layer.has_adapter(adapter_name)]
    for layer in sorted(ours, key=lambda m: int(m._v_key[adapter_name])):
        key = layer._v_key[adapter_name]
        if key not in holder:
            weight = layer.get_base_layer().weight
            v = torch.empty(config.u, dtype=layer._v_dtype[adapter_name])
            if config.init_weights is True:
                v.zero_()
            elif config.init_weights == "uniform":
                v.uniform_(-config.init_v_bound, config.init_v_bound)
            holder[key] = nn.Parameter(v.to(weight.device))
        layer.attach_vectors(vectors)
