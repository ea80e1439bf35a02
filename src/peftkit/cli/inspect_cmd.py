"""``peftkit inspect``: what an adapter directory holds, and how strongly it changes each layer.

Works from the saved files alone (no base model): the tensors of each adapted module are grouped by the method's
parameter prefix (from the registry), and the update ``ΔW`` is measured from its factors:

* low-rank ``ΔW = s · B A`` (LoRA, DoRA's direction, AdaLoRA's ``B (A ⊙ E)``, embedding LoRA): the singular values
  come from the ``r × r`` matrix ``R_B R_Aᵀ`` of two thin QR factorisations (``B = Q_B R_B``, ``Aᵀ = Q_A R_A``),
  so ``ΔW`` (out × in) is never formed;
* Hadamard products of two low-rank terms (LoHa) and Kronecker products (LoKr, ``σ(W1 ⊗ W2) = σ(W1) σ(W2)``);
* vectors that scale activations (IA3): the size of ``l - 1`` (a relative change, no singular values).

Reported per layer: ``‖ΔW‖_F`` and the effective rank ``exp(H(σ / Σσ))`` (Roy & Vetterli 2007): 1 for a rank-one
update, ``r`` when ``r`` directions are equally strong.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .common import CliError, read_json, require_adapter_dir

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class LayerStrength:
    """The update of one adapted module.

    Attributes:
        module: module path in the base model (``model.layers.0.self_attn.q_proj``).
        module_type: its last name component (``q_proj``).
        layer: the transformer block index found in the path, or None.
        shape: ``[out, in]`` of the (flattened) update.
        rank: the adapter rank (rows of A), None for vector methods.
        norm: ``‖ΔW‖_F`` (IA3: ``‖l - 1‖``).
        effective_rank: entropy effective rank of ``ΔW``; None for vector methods or a zero update.
    """

    module: str
    module_type: str
    layer: int | None
    shape: list[int]
    rank: int | None
    norm: float
    effective_rank: float | None


# ---------------------------------------------------------------------------------------------------- math
def effective_rank(sigma: torch.Tensor) -> float | None:
    """``exp(-Σ p log p)`` with ``p = σ / Σσ``; None when every singular value is (numerically) zero."""
    sigma = sigma.double().clamp(min=0)
    total = float(sigma.sum())
    if total <= 1e-12:
        return None
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def lowrank_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``b @ a`` for ``b: (out, r)``, ``a: (r, in)`` in ``O((out + in) r²)`` without forming it."""
    qb_r = torch.linalg.qr(b.double(), mode="r").R  # (r', r)
    qa_r = torch.linalg.qr(a.double().T, mode="r").R  # (r'', r)
    return torch.linalg.svdvals(qb_r @ qa_r.T)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A weight as ``(out, rest)`` (conv kernels flattened)."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t


def _kron_factor(params: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    if f"lokr_{which}" in params:
        return _flat(params[f"lokr_{which}"]).double()
    return (_flat(params[f"lokr_{which}_a"]).double() @ _flat(params[f"lokr_{which}_b"]).double())


def _strength(params: dict[str, torch.Tensor], scale: float) -> tuple[list[int], int | None, float, float | None]:
    """``(shape, rank, ‖ΔW‖_F, effective rank)`` of one module's update from its named factors."""
    if "lora_A" in params and "lora_B" in params:
        a, b = _flat(params["lora_A"]), _flat(params["lora_B"])
        if "lora_E" in params:  # AdaLoRA: B (A ⊙ E)
            a = a * params["lora_E"].reshape(-1, 1)
        sigma = lowrank_singular_values(b, a) * scale
        return [b.shape[0], a.shape[1]], a.shape[0], float(sigma.norm()), effective_rank(sigma)
    if "lora_embedding_A" in params:
        a, b = params["lora_embedding_A"], params["lora_embedding_B"]  # A: (r, vocab), B: (dim, r); ΔW = (B A)ᵀ
        sigma = lowrank_singular_values(b, a) * scale
        return [a.shape[1], b.shape[0]], a.shape[0], float(sigma.norm()), effective_rank(sigma)
    if "hada_w1_a" in params:
        w1 = _flat(params["hada_w1_a"]).double() @ _flat(params["hada_w1_b"]).double()
        w2 = _flat(params["hada_w2_a"]).double() @ _flat(params["hada_w2_b"]).double()
        sigma = torch.linalg.svdvals(w1 * w2) * scale
        return list(w1.shape), params["hada_w1_b"].shape[0], float(sigma.norm()), effective_rank(sigma)
    if any(k.startswith("lokr_w1") for k in params):
        w1, w2 = _kron_factor(params, "w1"), _kron_factor(params, "w2")
        sigma = torch.outer(torch.linalg.svdvals(w1), torch.linalg.svdvals(w2)).flatten() * scale
        rank = params["lokr_w2_a"].shape[1] if "lokr_w2_a" in params else None
        shape = [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        return shape, rank, float(sigma.norm()), effective_rank(sigma)
    vectors = [t for k, t in params.items() if t.dim() <= 2 and min(t.shape, default=1) == 1]
    if len(vectors) == len(params) == 1:  # a scaling vector (IA3): distance from the identity
        v = vectors[0].double().flatten()
        return [v.numel()], None, float((v - 1).norm()), None
    raise CliError(f"inspect does not know how to measure an update made of {sorted(params)}")


# ---------------------------------------------------------------------------------------------------- files
def _token_rows(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """``({module: [rows, dim]}, other tensors)``: the trainable token rows hold the new rows themselves, not a change
    of the base rows, so no strength can be measured from the file alone; they are reported by size only."""
    from ..methods.lora.tokens import TOKEN_ADAPTER
    from ..methods.trainable_tokens.layers import TrainableTokensLayer

    (row_name,) = TrainableTokensLayer.adapter_layer_names  # the rows' key (TrainableTokens, LoRA's token rows)
    rows: dict[str, list[int]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parts = key.removeprefix("base_model.model.").split(".")
        if parts[-1] != row_name:
            others[key] = tensor
            continue
        module = parts[:-2] if len(parts) > 1 and parts[-2] + "." == TOKEN_ADAPTER else parts[:-1]
        rows[".".join(module)] = list(tensor.shape)
    return rows, others


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``{module: {param: tensor}}`` for keys with a component starting with ``prefix``; the other tensors apart."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parts = key.removeprefix("base_model.model.").split(".")
        idx = next((i for i, p in enumerate(parts) if p.startswith(prefix)), None)
        if idx is None:
            others[key] = tensor
            continue
        # the key from the prefixed component on (``psoft_R.vector_a``): tensors of one submodule stay apart
        groups.setdefault(".".join(parts[:idx]), {})[".".join(parts[idx:])] = tensor
    return groups, others


def _scale(config: dict[str, Any], module: str, rank: int | None) -> float:
    """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) with the config's alpha pattern; 1 when there is no alpha.

    ``r`` is the module's saved rank, or ``init_r`` when the config has one (AdaLoRA's ``ranknum``).
    """
    from ..injection.match import pattern_value

    alpha = config.get("lora_alpha", config.get("alpha"))
    rank = config.get("init_r") or rank  # AdaLoRA divides by its initial rank, also after pruning and reloading
    if alpha is None or not rank:
        return 1.0
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha))  # type: ignore[arg-type]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _rank_of(params: dict[str, torch.Tensor]) -> int | None:
    for key in ("lora_A", "lora_embedding_A"):
        if key in params:
            return int(params[key].shape[0])
    for key in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if key in params:
            return int(params[key].shape[0])
    return None


def inspect_adapter(directory: str) -> dict[str, Any]:
    """Everything ``peftkit inspect`` reports about the adapter in ``directory``, as plain data."""
    from ..registry import get_method
    from ..serialization.files import load_peft_weights

    path = require_adapter_dir(directory)
    config = read_json(path / "adapter_config.json")
    tensors = load_peft_weights(str(path))
    spec = get_method(config.get("peft_type", "?"))
    token_rows, rest = _token_rows(tensors)
    groups, others = _group(rest, spec.prefix) if spec.kind == "adapter" else ({}, dict(rest))
    # tensors held once per model (MethodSpec.shared_state: VB-LoRA's base_model.vblora_vector_bank) are no layer;
    # each layer's measure gets them beside its own tensors
    # (or held by the layers and also saved once at model level: RandLoRA's base_model.randlora_A)
    shared = groups.pop("base_model", {}) if spec.shared_state is not None or spec.update_strength else {}
    layers = []
    for module, params in sorted(groups.items(), key=lambda kv: _natural_key(kv[0])):
        params = {**shared, **{k.removesuffix(".weight"): v for k, v in params.items()}}
        measure = spec.update_strength  # a method's own measure, else the built-in rules
        shape, rank, norm, erank = (measure(params, config) if measure is not None
                                    else _strength(params, _scale(config, module, _rank_of(params))))
        index = _LAYER_INDEX.search(f".{module}.")
        layers.append(LayerStrength(module, module.rsplit(".", 1)[-1], int(index.group(1)) if index else None,
                                    shape, rank, norm, erank))
    files = {f.name: f.stat().st_size for f in sorted(path.glob("adapter_model.*"))}
    method = str(config.get("peft_type")) + (" (DoRA)" if config.get("use_dora") else "")
    return {
        "directory": str(path), "method": method, "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"), "base_model": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"), "r": config.get("r"),
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "rank_pattern": config.get("rank_pattern") or {}, "modules_to_save": config.get("modules_to_save"),
        "adapted_modules": len(layers), "token_rows": token_rows,
        "parameters": sum(t.numel() for t in tensors.values()),
        "other_parameters": sum(t.numel() for t in others.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "file_bytes": files, "layers": [asdict(layer) for layer in layers],
        "by_module_type": _by_type(layers),
    }


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _by_type(layers: list[LayerStrength]) -> dict[str, dict[str, float | int | None]]:
    out: dict[str, dict[str, float | int | None]] = {}
    for kind in dict.fromkeys(layer.module_type for layer in layers):
        group = [layer for layer in layers if layer.module_type == kind]
        eranks = [layer.effective_rank for layer in group if layer.effective_rank is not None]
        out[kind] = {"modules": len(group), "mean_norm": sum(g.norm for g in group) / len(group),
                     "max_norm": max(g.norm for g in group),
                     "mean_effective_rank": sum(eranks) / len(eranks) if eranks else None}
    return out


# ---------------------------------------------------------------------------------------------------- output
def format_report(info: dict[str, Any]) -> str:
    """The human-readable report."""
    size = sum(info["file_bytes"].values())
    lines = [
        f"adapter:        {info['directory']}",
        f"method:         {info['method']}",
        f"task type:      {info['task_type']}",
        f"base model:     {info['base_model']}",
        f"targets:        {info['target_modules']}",
        f"rank:           {info['r']}" + (f"  (pattern: {info['rank_pattern']})" if info["rank_pattern"] else "")
        if info["num_virtual_tokens"] is None else f"virtual tokens: {info['num_virtual_tokens']}",
        f"parameters:     {info['parameters']:,d} ({info['other_parameters']:,d} outside adapter layers"
        + (f", modules_to_save: {info['modules_to_save']}" if info["modules_to_save"] else "") + ")",
        "files:          " + ", ".join(f"{k} {v:,d} bytes" for k, v in info["file_bytes"].items())
        + f"  (dtype {', '.join(info['dtypes'])}; {size / 2**20:.2f} MiB)",
        f"adapted layers: {info['adapted_modules']}",
        *(["token rows:     " + ", ".join(f"{m} {'x'.join(map(str, s))}" for m, s in info["token_rows"].items())
           + "  (new rows, not a change: not measured)"] if info.get("token_rows") else []),
        "",
    ]
    if info["layers"]:
        width = max(len(layer["module"]) for layer in info["layers"])
        lines.append(f"{'module':<{width}}  {'shape':>13}  {'r':>4}  {'|dW|_F':>10}  {'eff. rank':>9}")
        for layer in info["layers"]:
            shape = "x".join(map(str, layer["shape"]))
            erank = "-" if layer["effective_rank"] is None else f"{layer['effective_rank']:.2f}"
            rank = "-" if layer["rank"] is None else str(layer["rank"])
            lines.append(f"{layer['module']:<{width}}  {shape:>13}  {rank:>4}  {layer['norm']:>10.4g}  {erank:>9}")
        lines.append("")
        lines.append("by module type: " + "; ".join(
            f"{k}: mean |dW|_F {v['mean_norm']:.4g}" + (f", eff. rank {v['mean_effective_rank']:.2f}"
                                                      if v["mean_effective_rank"] is not None else "")
            for k, v in info["by_module_type"].items()))
    return "\n".join(lines)


def plot(info: dict[str, Any], path: str) -> None:
    """Draw ``‖ΔW‖_F`` per layer (one line per module type) and per module type (bars, effective rank on a twin
    axis) into the image ``path``. Needs matplotlib (``pip install peftkit[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed; pip install 'peftkit[plot]'") from None
    layers = info["layers"]
    if not layers:
        raise CliError("--plot: the adapter has no adapted layers to draw (prompt-learning methods have none; "
                       "trainable token rows are not drawn)")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for kind in info["by_module_type"]:
        points = [(layer["layer"] if layer["layer"] is not None else i, layer["norm"])
                  for i, layer in enumerate(layers) if layer["module_type"] == kind]
        ax1.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
    from matplotlib.ticker import MaxNLocator

    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("layer index" if any(layer["layer"] is not None for layer in layers) else "module")
    ax1.set_ylabel("‖ΔW‖_F")
    ax1.set_title(f"{info['method']}: update strength per layer")
    ax1.legend(fontsize="small")
    ax1.grid(alpha=0.3)
    kinds = list(info["by_module_type"])
    stats = info["by_module_type"]
    ax2.bar(range(len(kinds)), [stats[k]["mean_norm"] for k in kinds], color="tab:blue", alpha=0.7)
    ax2.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax2.set_ylabel("mean ‖ΔW‖_F", color="tab:blue")
    ax2.set_title("per module type")
    eranks = [stats[k]["mean_effective_rank"] for k in kinds]
    if any(e is not None for e in eranks):
        twin = ax2.twinx()
        twin.plot(range(len(kinds)), [e if e is not None else float("nan") for e in eranks], "o-", color="tab:red")
        twin.set_ylabel("mean effective rank", color="tab:red")
        twin.set_ylim(0, 1.15 * max(e for e in eranks if e is not None))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
