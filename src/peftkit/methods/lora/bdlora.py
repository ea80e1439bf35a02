"""BD-LoRA (``LoraConfig.use_bdlora``): LoRA with a block-diagonal A or B, for tensor-parallel multi-LoRA serving.

As the reference (🤗 PEFT 0.21.2 ``BdLoraConfig``, ``BdLoraLinearVariant``, ``BlockDiagonalLinear``): a targeted
linear whose name contains one of ``target_modules_bd_a`` (substring match) gets a block-diagonal A, one matching
``target_modules_bd_b`` a block-diagonal B, with ``n = nblocks`` blocks. A block-diagonal factor ``(out, in)`` is
stored as its diagonal blocks stacked by rows, ``weight: (out, in / n)`` (block ``i`` is rows
``i * out/n : (i+1) * out/n``), under the usual key (``lora_A.weight`` / ``lora_B.weight``). For ``x: (..., in)``

    y = base(x) + scaling * blockdiag(B) @ blockdiag(A) @ dropout(x),

so the adapter merges as ``W += scaling * blockdiag(B) @ blockdiag(A)``. At init a block-diagonal A is
``kaiming_uniform_`` (the reference's choice, ``a=0``) and a block-diagonal B is zero, so the adapter is identity
at init unless a plain B was left random (``init_lora_weights=False``). With ``match_strict=True`` (the default)
every target must match a pattern; with False an unmatched target is plain LoRA. BD-LoRA adapts plain ``nn.Linear``
layers only, as the reference (whose BD-LoRA fails with an ``AttributeError`` on transformers' Conv1D and refuses
quantized, embedding and convolution layers); BD-LoRA adapters cannot be combined by ``add_weighted_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...config import check, is_int
from ...errors import ConfigError, ConfigTypeError, MergeError
from ...injection.apply import defer_init, is_probing
from .variants import LoraVariant

if TYPE_CHECKING:
    from .layers import LoraLayer


@dataclass
class BdLoraConfig:
    """The reference's ``BdLoraConfig``: ``target_modules_bd_a`` / ``target_modules_bd_b`` (substrings of module
    names whose A / B is block-diagonal), ``nblocks`` (blocks per block-diagonal factor; the serving shard count)
    and ``match_strict`` (every target must match one of the patterns)."""

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)),
                  name, value, "allowed: None or a list of module-name substrings")
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        check(is_int(self.nblocks) and self.nblocks >= 1, "nblocks", self.nblocks, "allowed: an int >= 1")
        check(isinstance(self.match_strict, bool), "match_strict", self.match_strict, "allowed: True or False")
        overlap = sorted(set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or []))
        check(not overlap, "use_bdlora", overlap,
              f"a pattern cannot be in both target_modules_bd_a {self.target_modules_bd_a} and target_modules_bd_b "
              f"{self.target_modules_bd_b}")


def as_bdlora_config(value: object) -> BdLoraConfig | bool | None:
    """``LoraConfig.use_bdlora`` normalised at construction, as the reference: a dict (a loaded
    ``adapter_config.json``) becomes a :class:`BdLoraConfig` (unknown keys dropped); None and False mean off.
    Raises :class:`ConfigTypeError` (a ``TypeError``, as the reference) naming ``use_bdlora`` for any other type."""
    if value is None or value is False or isinstance(value, BdLoraConfig):
        return value  # type: ignore[return-value]
    if isinstance(value, dict):
        known = {f.name for f in fields(BdLoraConfig)}
        return BdLoraConfig(**{k: v for k, v in value.items() if k in known})
    raise ConfigTypeError("use_bdlora", value, "allowed: None, a BdLoraConfig or a dict of its fields")


@dataclass(frozen=True)
class BdChoice:
    """What BD-LoRA makes of one target: which factor is block-diagonal (``"A"`` or ``"B"``) and in how many
    blocks. The per-layer value of ``use_bdlora`` handed to :func:`bdlora_variant`."""

    side: str
    nblocks: int


#: init modes BD-LoRA combines with (the others either are variants of their own or compute A and B from the base
#: weight, which a block-diagonal factor cannot hold)
BD_INITS = (True, False, "gaussian")


def bdlora_choice(name: str, kind_ok: bool, in_features: int, out_features: int, r: int,
                  config: Any) -> BdChoice | None:
    """The :class:`BdChoice` for target ``name`` (``in_features -> out_features``, rank ``r``), or None when
    ``use_bdlora`` is off or the target matches no pattern with ``match_strict=False`` (plain LoRA). ``kind_ok``:
    the target is a (non-quantized) linear. Raises :class:`ConfigError` as the reference raises ``ValueError``."""
    bd = config.use_bdlora
    if not bd:
        return None
    if not kind_ok:
        raise ConfigError("use_bdlora", bd, f"BD-LoRA adapts nn.Linear layers only, as the reference; "
                          f"target {name!r} is not one. Exclude it from target_modules or set use_bdlora=None")
    init = config.init_lora_weights
    if not any(init is m or (isinstance(init, str) and init.lower() == m) for m in BD_INITS):
        raise ConfigError("init_lora_weights", init, f"BD-LoRA (use_bdlora) combines with init_lora_weights "
                          f"{list(BD_INITS)} only")
    on_a = any(p in name for p in bd.target_modules_bd_a or [])
    on_b = any(p in name for p in bd.target_modules_bd_b or [])
    if on_a and on_b:
        raise ConfigError("use_bdlora", bd, f"target {name!r} matches both target_modules_bd_a and "
                          "target_modules_bd_b; make the patterns disjoint")
    if not (on_a or on_b):
        if bd.match_strict:
            raise ConfigError("use_bdlora", bd, f"target {name!r} matches neither target_modules_bd_a nor "
                              "target_modules_bd_b; add a pattern for it, or set match_strict=False to give it "
                              "plain LoRA")
        return None
    side = "A" if on_a else "B"
    dims = (in_features, r) if on_a else (r, out_features)
    if any(d % bd.nblocks for d in dims):
        raise ConfigError("nblocks", bd.nblocks, f"target {name!r} has a block-diagonal {side} of shape "
                          f"(in={dims[0]}, out={dims[1]}); nblocks must divide both")
    return BdChoice(side, bd.nblocks)


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear ``in_features -> out_features`` whose matrix is block-diagonal with ``nblocks`` blocks of
    ``(out/n, in/n)``; ``weight: (out, in / n)`` holds the blocks stacked by rows (the reference's layout)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device, dtype=dtype))
        self.register_parameter("bias", None)  # bias-free, read as ``lora_B[name].bias`` like an nn.Linear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: block ``i`` of the output is ``x[..., block i] @ W_i.T``."""
        n = self.nblocks
        lead = x.shape[:-1]
        xb = x.reshape(-1, n, self.in_features // n).transpose(0, 1)  # (n, N, in/n)
        w = self.weight.view(n, self.out_features // n, self.in_features // n)  # (n, out/n, in/n)
        out = torch.bmm(xb, w.transpose(1, 2))  # (n, N, out/n)
        return out.transpose(0, 1).reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The full ``(out, in)`` block-diagonal matrix (zeros off the diagonal blocks)."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))


class BdLoraVariant(LoraVariant):
    """BD-LoRA on one adapter of a linear layer (see the module doc)."""

    name = "BD-LoRA"

    def __init__(self, choice: BdChoice) -> None:
        self.choice = choice

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Replace the block-diagonal factor by a :class:`BlockDiagonalLinear` on the old one's device and dtype
        (meta while a load will fill it); A is ``kaiming_uniform_``, B zero, as the reference."""
        side = self.choice.side
        holder = layer.lora_A if side == "A" else layer.lora_B
        old = holder[adapter_name].weight
        out_f, in_f = old.shape  # the plain factor's (out, in): A (r, in), B (out, r)
        new = BlockDiagonalLinear(in_f, out_f, self.choice.nblocks, device=old.device, dtype=old.dtype)
        if not old.is_meta and side == "A":
            nn.init.kaiming_uniform_(new.weight)  # the reference's init of a block-diagonal A (a=0)
        elif not old.is_meta:
            nn.init.zeros_(new.weight)
        else:
            base = layer.adapted_weight()
            if not base.is_meta and not is_probing():
                defer_init([new.weight], base.device)
        new.weight.requires_grad_(old.requires_grad)
        holder[adapter_name] = new

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``result (..., out) + scaling * B(A(dropout(x)))`` for ``x: (..., in)``, out of place."""
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        h = layer._cast_input_dtype(layer.lora_dropout[adapter_name](x), A.weight.dtype)
        return result + (B(A(h)) * layer.scaling[adapter_name]).to(result.dtype)

    def merge(self, layer: LoraLayer, adapter_name: str, safe_merge: bool) -> None:
        base = layer.get_base_layer()
        new = base.weight.data + layer.get_delta_weight(adapter_name).detach()
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        with torch.no_grad():
            base.weight.data.copy_(new)

    def unmerge(self, layer: LoraLayer, adapter_name: str) -> None:
        base = layer.get_base_layer()
        with torch.no_grad():
            base.weight.data.sub_(layer.get_delta_weight(adapter_name).detach())


def bdlora_variant(layer: LoraLayer, value: Any) -> LoraVariant:
    """The :data:`~.variants.VARIANT_FIELDS` factory of ``use_bdlora``: the per-layer :class:`BdChoice` (from the
    layer options) gives a :class:`BdLoraVariant`; a :class:`BdLoraConfig` reaching a layer directly means a layer
    kind BD-LoRA does not adapt (the layer options resolve it for linears)."""
    from .layers import Linear
    from .quantized import QuantLinear

    if isinstance(value, BdChoice) and isinstance(layer, Linear) and not isinstance(layer, QuantLinear):
        return BdLoraVariant(value)
    kind = type(layer.get_base_layer()).__name__
    raise ConfigError("use_bdlora", value, f"BD-LoRA adapts nn.Linear layers only, as the reference; a "
                      f"target is a {kind}. Exclude it from target_modules or set use_bdlora=None")
