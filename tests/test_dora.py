"""DoRA (``use_dora=True``) on every layer kind: ``nn.Linear`` (Llama, T5), GPT-2 ``Conv1D``, ``nn.Embedding``
(custom model and Llama ``embed_tokens``) and ``nn.Conv1d/2d``.

Checked here: each layer against a dense effective weight computed in this file from the saved tensors
(``m * (V + sΔ) / ||V + sΔ||`` with the kind's norm axis), the saved key ``lora_magnitude_vector`` (no ``.weight``)
and its shape per kind, identity at init, merge/unmerge, the training-mode dropout formula, the eval-path norm cache,
and interop both ways with the reference library. Generic properties (only the adapter trains, save/load exact,
merge/unload, disable) come from the conformance suite, which runs LoRA's DoRA example config over every tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models import CASES_BY_NAME, MLP, Conv2dModel, model_output
from numerics import TINY_MODEL_REDUCTION, fp_tol
from safetensors.torch import load_file

import peftkit
from peftkit.methods.lora.layers import Conv, Embedding, Linear, LoraLayer
from peftkit.registry import get_method

# float32, the same math by other kernels or in another order (a hook's functional recomputation, merged weights,
# the reference, adapters summed in another order): model outputs over the tiny models' reductions; weights and
# weight norms over one row of a weight (<= 64 features) plus the rank
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
WEIGHT_TOL = fp_tol(torch.float32, 64 + 8)
ATOL = TOL["atol"]

#: setup id -> (test case, target modules, or None for the case's own)
SETUPS: dict[str, tuple[str, list[str] | None]] = {
    "llama": ("llama-causal", None),
    "llama-embed": ("llama-causal", ["embed_tokens", "q_proj"]),
    "gpt2": ("gpt2-causal", None),
    "t5": ("t5-seq2seq", None),
    "emb": ("custom-emb", None),
    "conv2d": ("custom-conv2d", None),
    "conv1d": ("custom-conv1d", None),
}


def _config(setup: str, lib=peftkit, **kwargs):
    case_name, targets = SETUPS[setup]
    case = CASES_BY_NAME[case_name]
    return case, lib.LoraConfig(r=4, lora_alpha=8, use_dora=True, task_type=case.task_type,
                                target_modules=list(targets or case.target_modules), **kwargs)


def _dora_model(setup: str, seed: int = 0):
    """Random A and B (``init_lora_weights=False``) and magnitudes perturbed away from the norms, in eval mode."""
    case, cfg = _config(setup, init_lora_weights=False)
    torch.manual_seed(seed)
    model = peftkit.get_peft_model(case.build(), cfg)
    _perturb_magnitudes(model, seed)
    return case, model.eval()


def _perturb_magnitudes(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))


def _out(model, case):
    with torch.no_grad():
        return model_output(model(**case.make_inputs(2)), case.output_key)


def _dora_layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_magnitude_vector)}


# ------------------------------------------------------------------------------------------------ dense reference
# Written out per kind, independently of the library's "norm view" code.


def _dense_weight(layer: LoraLayer, W: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The effective DoRA weight in the base weight's own layout, from the base weight ``W`` and the saved tensors
    ``t`` of one layer (keys without the module path)."""
    s, m = layer.scaling["default"], t["lora_magnitude_vector"]
    if isinstance(layer, Embedding):  # W: (num_emb, dim); A: (r, num_emb); B: (dim, r); m: (dim,)
        V = W + s * (t["lora_embedding_B"] @ t["lora_embedding_A"]).T
        return V * (m / V.norm(dim=0))
    if isinstance(layer, Conv):  # W: (out, in, *k); A: (r, in, *k); B: (out, r, 1...); m: (1, out, 1...)
        r = t["lora_A.weight"].shape[0]
        V = W + s * (t["lora_B.weight"].reshape(-1, r) @ t["lora_A.weight"].reshape(r, -1)).reshape(W.shape)
        n = V.flatten(1).norm(dim=1)
        return (m.flatten() / n).reshape(-1, *(1,) * (W.dim() - 1)) * V
    W_oi = W.T if layer.fan_in_fan_out else W  # Linear: (out, in); GPT-2 Conv1D stores (in, out)
    V = W_oi + s * t["lora_B.weight"] @ t["lora_A.weight"]
    eff = (m / V.norm(dim=1)).view(-1, 1) * V
    return eff.T if layer.fan_in_fan_out else eff


def _expected_magnitude_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The reference's shapes: ``(out,)`` linear, ``(embedding_dim,)`` embedding, ``(1, out, 1, ...)`` conv."""
    W = layer.get_base_layer().weight
    if isinstance(layer, Embedding):
        return (W.shape[1],)
    if isinstance(layer, Conv):
        return (1, W.shape[0]) + (1,) * (W.dim() - 2)
    return (W.shape[1] if layer.fan_in_fan_out else W.shape[0],)


def _functional(layer: LoraLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's forward with ``weight`` in place of its own."""
    base = layer.get_base_layer()
    if isinstance(layer, Embedding):
        return F.embedding(x, weight, base.padding_idx)
    if isinstance(layer, Conv):
        return base._conv_forward(x, weight, base.bias)
    W_oi = weight.T if layer.fan_in_fan_out else weight
    return F.linear(x, W_oi, base.bias)


def _saved_per_layer(path: Path, layers: dict[str, LoraLayer]) -> dict[str, dict[str, torch.Tensor]]:
    """The saved tensors grouped by layer (the saved keys carry no adapter name)."""
    saved = load_file(path / "adapter_model.safetensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name in layers:  # module names from the PeftModel: "base_model.model.<path>", as the saved keys
        grouped[name] = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(f"{name}.")}
    return grouped


@pytest.mark.parametrize("setup", list(SETUPS))
def test_layers_match_dense_formula_from_saved_tensors_and_merge(setup, tmp_path):
    """Every DoRA layer's output equals the base forward with the dense effective weight built from the saved
    tensors; the saved magnitude has the reference's key and shape; merging writes exactly that weight and keeps the
    model's outputs; unmerge restores W; merge_and_unload keeps the outputs."""
    case, model = _dora_model(setup)
    layers = _dora_layers(model)
    assert {type(m) for m in layers.values()} <= {Linear, Embedding, Conv} and layers
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            seen.setdefault(name, (args[0], output))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    out = _out(model, case)
    for h in hooks:
        h.remove()
    assert set(seen) == set(layers)
    model.save_pretrained(tmp_path)
    saved = _saved_per_layer(tmp_path, layers)
    originals = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    dense = {}
    for name, layer in layers.items():
        t = saved[name]
        assert "lora_magnitude_vector.weight" not in t
        assert tuple(t["lora_magnitude_vector"].shape) == _expected_magnitude_shape(layer)
        dense[name] = _dense_weight(layer, originals[name], t)
        x, y = seen[name]
        torch.testing.assert_close(y, _functional(layer, x, dense[name]), **TOL)

    model.merge_adapter()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), dense[name], **WEIGHT_TOL)
    torch.testing.assert_close(_out(model, case), out, **TOL)
    model.unmerge_adapter()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), originals[name], **TOL)
    torch.testing.assert_close(_out(model, case), out, **TOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(_out(merged, case), out, **TOL)


@pytest.mark.parametrize("setup", ["llama", "llama-embed", "gpt2", "t5", "emb", "conv2d", "conv1d"])
def test_identity_at_init_and_magnitude_is_the_weight_norm(setup):
    case, cfg = _config(setup)
    base = case.build().eval()
    ref = _out(base, case)
    model = peftkit.get_peft_model(base, cfg).eval()
    torch.testing.assert_close(_out(model, case), ref, **TOL)
    for layer in _dora_layers(model).values():
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.requires_grad
        W = layer.get_base_layer().weight.detach()
        # with the default init the update is zero, so the effective weight is W itself
        torch.testing.assert_close(_dense_weight(layer, W, {**_zero_update(layer), "lora_magnitude_vector": magnitude}),
                                   W, **WEIGHT_TOL)
        torch.testing.assert_close(magnitude.detach().flatten(), _weight_norm(layer, W), **WEIGHT_TOL)


def _weight_norm(layer: LoraLayer, W: torch.Tensor) -> torch.Tensor:
    """``||W||`` along the kind's norm axis, flattened."""
    if isinstance(layer, Embedding):
        return W.norm(dim=0)
    if isinstance(layer, Conv):
        return W.flatten(1).norm(dim=1)
    return (W.T if layer.fan_in_fan_out else W).norm(dim=1)


def _ab_keys(layer: LoraLayer) -> tuple[str, str]:
    """The saved-file keys (without the module path) of A and B."""
    return ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, Embedding) else ("lora_A.weight",
                                                                                          "lora_B.weight")


def _zero_update(layer: LoraLayer) -> dict[str, torch.Tensor]:
    """The layer's A and B under the keys of the saved file, checked to give a zero update (default init)."""
    A, B = layer._lora_weights("default")
    assert torch.count_nonzero(A) == 0 or torch.count_nonzero(B) == 0
    return dict(zip(_ab_keys(layer), (A.detach(), B.detach()), strict=True))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_forward_matches_dense_formula_with_dropout_in_train_mode(kind):
    """Training mode with dropout: ``base(x) + (m/n - 1) W drop(x) + (m/n) s B A drop(x)`` (conv: convolutions)."""
    torch.manual_seed(0)
    base, target = (MLP(), "lin0") if kind == "linear" else (Conv2dModel(), "conv")
    cfg = peftkit.LoraConfig(r=2, lora_alpha=4, use_dora=True, init_lora_weights=False, lora_dropout=0.5,
                             target_modules=[target])
    model = peftkit.get_peft_model(base, cfg)
    _perturb_magnitudes(model, 1)
    layer = getattr(model.base_model.model, target)
    x = torch.randn(3, 10) if kind == "linear" else torch.randn(3, 3, 8, 8)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    dropped = layer.lora_dropout["default"](x)
    base_layer = layer.get_base_layer()
    W, b = base_layer.weight, base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    m = layer.lora_magnitude_vector["default"].weight
    if kind == "linear":
        f = m / (W + s * B @ A).norm(dim=1)
        expected = x @ W.T + b + (f - 1) * (dropped @ W.T) + f * s * (dropped @ A.T @ B.T)
    else:
        delta = (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
        f = m / (W + s * delta).flatten(1).norm(dim=1).view(1, -1, 1, 1)
        conv = lambda inp, w, bias=None: F.conv2d(inp, w, bias, padding=1)
        expected = conv(x, W, b) + (f - 1) * conv(dropped, W) + f * s * F.conv2d(conv(dropped, A), B)
    torch.testing.assert_close(y, expected, **TOL)
    # the norm is detached: the magnitude gets a gradient, the norm's path through A/B contributes none
    y.sum().backward()
    assert m.grad is not None and A.grad is not None


@pytest.mark.parametrize("setup", ["llama", "emb", "conv2d"])
def test_weight_norm_cache_hit_and_invalidation(setup, monkeypatch):
    """In eval with frozen weights the norm is computed once (forward after forward hits the cache); changing B, W
    or the scaling recomputes it, and the forward uses the new norm."""
    case, model = _dora_model(setup)
    layer = next(iter(_dora_layers(model).values()))
    computed = []
    original = layer._dora_norm
    monkeypatch.setattr(layer, "_dora_norm", lambda adapter: computed.append(adapter) or original(adapter))
    out = _out(model, case)
    _out(model, case)
    _out(model, case)
    assert computed == ["default"]  # three forwards, one norm computation
    first = layer.dora_weight_norm("default")
    assert layer.dora_weight_norm("default") is first and computed == ["default"]
    A, B = layer._lora_weights("default")
    with torch.no_grad():
        B.add_(0.5)
    second = layer.dora_weight_norm("default")
    assert second is not first and not torch.allclose(second, first)
    W = layer.get_base_layer().weight.detach()
    t = dict(zip(_ab_keys(layer), (A.detach(), B.detach()), strict=True))
    torch.testing.assert_close(second.flatten(), _dense_norm(layer, W, t), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_out(model, case), out, atol=1e-4)  # the forward used the new norm
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(2)
    third = layer.dora_weight_norm("default")
    assert third is not second
    layer.scaling["default"] = layer.scaling["default"] * 2
    assert layer.dora_weight_norm("default") is not third


def _dense_norm(layer: LoraLayer, W: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||W + sΔ||`` along the kind's norm axis, flattened: ``(out,)`` or ``(embedding_dim,)``."""
    s = layer.scaling["default"]
    if isinstance(layer, Embedding):
        return (W + s * (t["lora_embedding_B"] @ t["lora_embedding_A"]).T).norm(dim=0)
    if isinstance(layer, Conv):
        r = t["lora_A.weight"].shape[0]
        delta = (t["lora_B.weight"].reshape(-1, r) @ t["lora_A.weight"].reshape(r, -1)).reshape(W.shape)
        return (W + s * delta).flatten(1).norm(dim=1)
    W_oi = W.T if layer.fan_in_fan_out else W
    return (W_oi + s * t["lora_B.weight"] @ t["lora_A.weight"]).norm(dim=1)


def test_dora_rejects_mixed_batches():
    for setup in ("llama", "emb", "conv2d"):
        case, model = _dora_model(setup)
        with pytest.raises(ValueError, match="DoRA"):
            model(**case.make_inputs(2), adapter_names=["default", "__base__"])


def test_registry_example_runs_dora():
    """The conformance suite covers DoRA through one of LoRA's example configs."""
    assert any(kw.get("use_dora") for kw in get_method("LORA").example_configs)


@pytest.mark.interop
@pytest.mark.parametrize("setup", list(SETUPS))
def test_interop_with_reference(setup, tmp_path):
    """Ours -> reference and reference -> ours: outputs within 1e-5, same saved keys and shapes, and merged models
    that agree across libraries."""
    peft = pytest.importorskip("peft")
    case, ours = _dora_model(setup, seed=3)
    our_out = _out(ours, case)
    ours.save_pretrained(tmp_path / "ours")
    ref_loaded = peft.PeftModel.from_pretrained(case.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(ref_loaded, case), our_out, **TOL)

    _, cfg = _config(setup, lib=peft, init_lora_weights=False)
    torch.manual_seed(4)
    ref = peft.get_peft_model(case.build(), cfg)
    _perturb_magnitudes(ref, 4)
    ref.eval()
    ref_out = _out(ref, case)
    ref.save_pretrained(tmp_path / "ref")
    ours_loaded = peftkit.PeftModel.from_pretrained(case.build(), tmp_path / "ref").eval()
    torch.testing.assert_close(_out(ours_loaded, case), ref_out, **TOL)
    # the reference also stores the full embedding matrix when an embedding is targeted; peftkit does not (README,
    # differences: "Small files")
    ref_keys = {k: v.shape for k, v in load_file(tmp_path / "ref" / "adapter_model.safetensors").items()
                if not k.endswith("embed_tokens.base_layer.weight")}
    our_keys = {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    assert our_keys == ref_keys
    assert any(k.endswith("lora_magnitude_vector") for k in our_keys)
    merged_ref = ref.merge_and_unload()
    merged_ours = ours_loaded.merge_and_unload()
    torch.testing.assert_close(_out(merged_ours, case), _out(merged_ref, case), **TOL)
    assert not any(isinstance(m, LoraLayer) for m in merged_ours.modules())


@pytest.mark.parametrize("setup", ["llama", "emb", "conv2d"])
def test_two_active_dora_adapters_each_rescale_the_base_output(setup):
    """peftkit's deliberate difference (README): with several active DoRA adapters each one adds
    ``(m/n - 1) * base + (m/n) * s B A x`` relative to the base output, so the updates add up in any order."""
    case, model = _dora_model(setup)
    _, cfg = _config(setup, init_lora_weights=False)
    torch.manual_seed(7)
    model.add_adapter("other", cfg)
    _perturb_magnitudes(model, 8)
    model.eval()
    with model.disable_adapter():
        base = _out(model, case)
    single = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        single[name] = _out(model, case) - base
    assert all(d.abs().max() > 1e-4 for d in single.values())
    outputs = {}
    for order in (["default", "other"], ["other", "default"]):
        model.base_model.set_adapter(order)
        outputs[tuple(order)] = _out(model, case)
    if setup != "llama":  # one adapted layer right before a linear head: the updates add up in the output
        torch.testing.assert_close(outputs[("default", "other")], base + single["default"] + single["other"],
                                   **TOL)
    torch.testing.assert_close(outputs[("default", "other")], outputs[("other", "default")],
                               **TOL)
