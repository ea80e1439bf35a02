"""LoRA-GA (``init_lora_weights="lora_ga"``, ``LoraGAConfig``, ``preprocess_loraga``): the estimated gradients are
the mean over the backward passes (against plain autograd and the reference's preprocessing); A and B follow the
gradient's SVD as ``direction`` / ``scale`` say (a plain implementation, and the reference with the same SVD);
with the real randomized SVD the subspaces equal the reference's; the output is unchanged at init; adapters
round-trip between the libraries on the residual base and convert to plain LoRA; bad configs raise typed errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError, ConfigTypeError
from peftkit.methods.lora.layers import Linear
from tests.models import tiny_llama
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

TARGETS = ["q_proj", "v_proj", "down_proj"]
DIRECTIONS = ["ArBr", "A2rBr", "ArB2r"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]
R, ALPHA = 4, 8


def _batches(n: int = 4, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (batch, 8), generator=g) for _ in range(n)]


def _config(lib=peftkit, **ga):
    return lib.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                          lora_ga_config=lib.LoraGAConfig(**ga))


def _step(model, batches):
    def train_step() -> None:
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()
    return train_step


def _out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: m._peft_loraga_grad for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}


def _exact_svd(A: torch.Tensor, q: int = 6, niter: int = 2, M: torch.Tensor | None = None):
    """A deterministic stand-in for ``torch.svd_lowrank`` (whose random projection draws from the global RNG, which
    the two libraries consume differently before it): the exact SVD with the sign of each ``U`` column fixed by its
    first entry, so both libraries see the same factors."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    sign = torch.sign(U[:1])
    return (U * sign)[:, :q], S[:q], (Vh * sign.t())[:q].t()


@pytest.fixture
def exact_svd(monkeypatch):
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd)


#: the gradients are float32 sums over 4 batches of 2 x 8 tokens through the tiny model's reductions
GRAD_TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
#: an SVD of a (<= 64)-wide float32 matrix and a rank-4 product: a generous factor for its iterative rounding
FACTOR_TOL = fp_tol(torch.float32, 64, factor=16)


# ------------------------------------------------------------------------------------------------ math


def test_gradients_are_the_mean_over_backward_passes_and_the_model_is_restored():
    """Plain autograd: the gradient of the summed losses divided by the number of backward passes (4), for the
    targeted weights only; afterwards ``requires_grad``, ``.grad`` and eval mode are as before; an iterable of
    batches (streamed with a progress bar) gives the same gradients as the callable."""
    base = tiny_llama().eval()
    batches = _batches()
    plain = copy.deepcopy(base)
    plain.train()
    for b in batches:
        plain(input_ids=b, labels=b).loss.backward()
    expected = {n: m.weight.grad / len(batches) for n, m in plain.named_modules() if n.split(".")[-1] in TARGETS}
    model = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peftkit.preprocess_loraga(model, _config(), _step(model, batches))
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    grads = _grads(model)
    assert grads.keys() == expected.keys() and len(grads) == 6
    for name in grads:  # the same math in another grouping of the backward passes
        torch.testing.assert_close(grads[name], expected[name], **GRAD_TOL)
    streamed = copy.deepcopy(base)
    peftkit.preprocess_loraga(streamed, _config(), [{"input_ids": b, "labels": b} for b in batches])
    for name, grad in _grads(streamed).items():
        torch.testing.assert_close(grad, grads[name], **GRAD_TOL)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_factors_follow_the_gradient_svd_on_a_plain_implementation(direction, scale, exact_svd):
    """``G = U S V^T`` (top 2r): A gets ``V^T`` rows, B gets ``U`` columns times ``S``, per ``direction``; then the
    ``scale`` rule; the base holds ``W - s * B @ A``."""
    base = tiny_llama().eval()
    model = copy.deepcopy(base)
    cfg = _config(direction=direction, scale=scale)
    peftkit.preprocess_loraga(model, cfg, _step(model, _batches()))
    name = "model.layers.0.self_attn.v_proj"  # (16, 32): out != in
    G = model.get_submodule(name)._peft_loraga_grad.clone()
    W = base.get_submodule(name).weight.detach()
    layer = peftkit.get_peft_model(model, cfg).get_submodule(f"base_model.model.{name}")
    assert isinstance(layer, Linear)
    U, S, V = _exact_svd(G, q=4 * R)
    a_idx, b_idx = {"ArBr": ([1, 3, 5, 7], [0, 2, 4, 6]), "A2rBr": ([4, 5, 6, 7], [0, 1, 2, 3]),
                    "ArB2r": ([0, 1, 2, 3], [4, 5, 6, 7])}[direction]
    A, B = V[:, a_idx].t(), U[:, b_idx] * S[b_idx]
    s = ALPHA / R
    if scale == "stable":
        B = B * (W.shape[0] ** 0.25 / 16**0.5)
    elif scale == "weight_svd":
        B = B * (torch.linalg.svdvals(W)[0] / S[b_idx][0])
    elif scale == "gd_scale":
        A, B = A / s, B / s
    torch.testing.assert_close(layer.lora_A["default"].weight, A, **FACTOR_TOL)
    torch.testing.assert_close(layer.lora_B["default"].weight, B, **FACTOR_TOL)
    torch.testing.assert_close(layer.get_base_layer().weight, W - s * B @ A, **FACTOR_TOL)


@pytest.mark.parametrize("direction", [*DIRECTIONS, "random"])
def test_identity_at_init(direction):
    base = tiny_llama().eval()
    x = _batches(1, seed=7)[0]
    model = copy.deepcopy(base)
    cfg = _config(direction=direction)
    peftkit.preprocess_loraga(model, cfg, _step(model, _batches()))
    peft_model = peftkit.get_peft_model(model, cfg).eval()
    # W - s*B@A + s*B@A rounds once per weight element; outputs are of order one
    torch.testing.assert_close(_out(peft_model, x), _out(base, x), **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    layers = [m for m in peft_model.modules() if isinstance(m, Linear)]
    assert len(layers) == 6
    merged = copy.deepcopy(peft_model).merge_and_unload()  # merging W_res + s*B@A gives back W's outputs
    torch.testing.assert_close(_out(merged, x), _out(base, x), **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    for layer in layers:
        assert not hasattr(layer.get_base_layer(), "_peft_loraga_grad")  # consumed, as the reference
        assert layer.lora_B["default"].weight.abs().max() > 0  # not a zero-B init


# ------------------------------------------------------------------------------------------ the reference


@pytest.mark.interop
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_preprocessing_and_init_equal_the_reference_given_the_same_svd(direction, scale, exact_svd, tmp_path):
    """Same batches: equal gradients (also in the cache files both write), and with the same SVD equal A, B and
    residual base weights; equal outputs; equal ``lora_ga_config`` in ``adapter_config.json``."""
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    batches = _batches()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    peftkit.preprocess_loraga(ours, _config(direction=direction, scale=scale), _step(ours, batches),
                              cache_file=str(tmp_path / "ours.pt"))
    peft.preprocess_loraga(theirs, _config(peft, direction=direction, scale=scale), _step(theirs, batches),
                           cache_file=str(tmp_path / "ref.pt"))
    g_ours, g_ref = torch.load(tmp_path / "ours.pt"), torch.load(tmp_path / "ref.pt")
    assert g_ours.keys() == g_ref.keys() and len(g_ours) == 6
    for key in g_ours:
        torch.testing.assert_close(g_ours[key], g_ref[key], **GRAD_TOL)
    p_ours = peftkit.get_peft_model(ours, _config(direction=direction, scale=scale)).eval()
    p_ref = peft.get_peft_model(theirs, _config(peft, direction=direction, scale=scale)).eval()
    ref_modules = dict(p_ref.named_modules())
    for name, layer in p_ours.named_modules():
        if isinstance(layer, Linear):
            other = ref_modules[name]
            for attr in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(layer, attr)["default"].weight,
                                           getattr(other, attr)["default"].weight, **FACTOR_TOL)
            torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight, **FACTOR_TOL)
    x = batches[0]
    torch.testing.assert_close(_out(p_ours, x), _out(p_ref, x), atol=1e-5, rtol=0)
    for lib, model in ((peftkit, p_ours), (peft, p_ref)):
        model.save_pretrained(tmp_path / lib.__name__)
    configs = [json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("peftkit", "peft")]
    assert configs[0]["lora_ga_config"] == configs[1]["lora_ga_config"] == {
        "direction": direction, "scale": scale, "stable_gamma": 16}


def _projector(M: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(M)
    return Q @ Q.t()


@pytest.mark.interop
def test_randomized_svd_gives_the_references_subspaces():
    """With the real ``torch.svd_lowrank`` (random projections drawn differently in the two libraries) the row
    space of A and the column space of B equal the reference's (projectors), and B's column norms agree as sets:
    equal up to sign and rotation within each space."""
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    batches = _batches()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    peftkit.preprocess_loraga(ours, _config(), _step(ours, batches))
    peft.preprocess_loraga(theirs, _config(peft), _step(theirs, batches))
    torch.manual_seed(0)
    p_ours = peftkit.get_peft_model(ours, _config())
    torch.manual_seed(1)
    p_ref = peft.get_peft_model(theirs, _config(peft))
    ref_modules = dict(p_ref.named_modules())
    # randomized SVD with q = 4r and 4 power iterations: the projectors agree to ~2e-4 on these spectra (measured),
    # far below the O(1) difference of another subspace; 10x margin
    tol = {"atol": 2e-3, "rtol": 0}
    for name, layer in p_ours.named_modules():
        if not isinstance(layer, Linear):
            continue
        other = ref_modules[name]
        A1, A2 = layer.lora_A["default"].weight.detach(), other.lora_A["default"].weight.detach()
        B1, B2 = layer.lora_B["default"].weight.detach(), other.lora_B["default"].weight.detach()
        torch.testing.assert_close(_projector(A1.t()), _projector(A2.t()), **tol)
        torch.testing.assert_close(_projector(B1), _projector(B2), **tol)
        # B's column norms are singular values times the scale (down to ~3e-4 here): compare relatively
        torch.testing.assert_close(B1.norm(dim=0).sort().values, B2.norm(dim=0).sort().values,
                                   atol=1e-8, rtol=1e-3)


@pytest.mark.interop
@pytest.mark.parametrize("saver", ["peftkit", "peft"])
def test_adapters_round_trip_between_the_libraries_on_the_residual_base(saver, tmp_path):
    """As saved (``init_lora_weights="lora_ga"`` kept): loading finds no gradient, falls back to the default init
    without touching the base weight and adopts the saved factors, in both libraries; on the residual base the
    trained outputs come back (1e-5). The same with ``init_lora_weights=True`` set before saving."""
    peft = pytest.importorskip("peft")
    lib = peftkit if saver == "peftkit" else peft
    base = tiny_llama().eval()
    batches = _batches()
    model = copy.deepcopy(base)
    lib.preprocess_loraga(model, _config(lib), _step(model, batches))
    peft_model = lib.get_peft_model(model, _config(lib))
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for b in batches[:2]:
        opt.zero_grad()
        peft_model(input_ids=b, labels=b).loss.backward()
        opt.step()
    peft_model.eval()
    x = batches[-1]
    trained = _out(peft_model, x)
    peft_model.save_pretrained(tmp_path / "as_is")
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "plain")
    residual = copy.deepcopy(peft_model).unload().state_dict()
    for folder in ("as_is", "plain"):
        for loader in (peftkit, peft):
            fresh = copy.deepcopy(base)
            fresh.load_state_dict(residual)
            loaded = loader.PeftModel.from_pretrained(fresh, tmp_path / folder).eval()
            torch.testing.assert_close(_out(loaded, x), trained, atol=1e-5, rtol=0,
                                       msg=f"{saver} {folder} -> {loader.__name__}")


@pytest.mark.interop
def test_conversion_to_plain_lora_loads_on_the_original_base_in_both_libraries(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    batches = _batches()
    model = copy.deepcopy(base)
    peftkit.preprocess_loraga(model, _config(), _step(model, batches))
    peft_model = peftkit.get_peft_model(model, _config())
    peft_model.save_pretrained(tmp_path / "initial")
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for b in batches[:2]:
        opt.zero_grad()
        peft_model(input_ids=b, labels=b).loss.backward()
        opt.step()
    peft_model.eval()
    x = batches[-1]
    trained = _out(peft_model, x)
    assert (trained - _out(base, x)).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (2 * R, 2 * ALPHA, True)
    for lib in (peftkit, peft):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted").eval()
        torch.testing.assert_close(_out(loaded, x), trained, atol=1e-5, rtol=0)


@pytest.mark.interop
def test_cache_files_are_read_by_the_other_library(tmp_path, exact_svd):
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    batches = _batches()
    x = batches[0]
    for writer in (peftkit, peft):
        path = str(tmp_path / f"{writer.__name__}.pt")
        model = copy.deepcopy(base)
        writer.preprocess_loraga(model, _config(writer), _step(model, batches), cache_file=path)
        expected = _out(writer.get_peft_model(model, _config(writer)).eval(), x)
        for reader in (peftkit, peft):
            fresh = copy.deepcopy(base)
            reader.preprocess_loraga(fresh, _config(reader), lambda: pytest.fail("the cache was not used"),
                                     cache_file=path)
            loaded = reader.get_peft_model(fresh, _config(reader)).eval()
            torch.testing.assert_close(_out(loaded, x), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_configs_raise_typed_errors_naming_the_field():
    with pytest.raises(ConfigError, match="lora_ga_config.direction"):
        peftkit.LoraGAConfig(direction="BA")
    with pytest.raises(ConfigError, match="lora_ga_config.scale"):
        peftkit.LoraGAConfig(scale="huge")
    with pytest.raises(ConfigError, match="lora_ga_config.stable_gamma"):
        peftkit.LoraGAConfig(stable_gamma=0)
    with pytest.raises(ConfigTypeError, match="lora_ga_config.stable_gamma"):
        peftkit.LoraGAConfig(stable_gamma="16")
    with pytest.raises(ConfigTypeError, match="lora_ga_config"):
        peftkit.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=3)
    with pytest.raises(ConfigError, match="lora_ga_config"):
        peftkit.LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"direction": "ArBr", "gamma": 2})
    loaded = peftkit.LoraConfig.from_dict({**_config().to_dict(), "lora_ga_config": {"scale": "unit"}})
    assert loaded.lora_ga_config == peftkit.LoraGAConfig(scale="unit")


def test_preprocess_and_init_errors_name_the_field():
    base = tiny_llama().eval()
    no_sub = peftkit.LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="lora_ga")
    with pytest.raises(ConfigError, match="lora_ga_config"):
        peftkit.preprocess_loraga(copy.deepcopy(base), no_sub, lambda: None)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        peftkit.preprocess_loraga(copy.deepcopy(base), peftkit.LoraConfig(target_modules=TARGETS), lambda: None)
    model = copy.deepcopy(base)
    peftkit.preprocess_loraga(model, _config(), _step(model, _batches(1)))
    with pytest.raises(ConfigError, match="lora_ga_config"):  # gradients attached, but no LoraGAConfig to use
        peftkit.get_peft_model(model, no_sub)


@pytest.mark.interop
def test_gpt2_conv1d_layers_match_the_reference(exact_svd):
    """GPT-2's ``Conv1D`` (weight ``(in, out)``): the gradient is transposed to ``(out, in)`` and the residual written
    back transposed; ``"stable"`` scaling uses the stored weight's first dimension, as the reference."""
    peft = pytest.importorskip("peft")
    from tests.models import tiny_gpt2

    base = tiny_gpt2().eval()
    batches = _batches()
    kw = {"r": R, "lora_alpha": ALPHA, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": "lora_ga"}
    cfg = peftkit.LoraConfig(**kw, lora_ga_config=peftkit.LoraGAConfig())
    ref_cfg = peft.LoraConfig(**kw, lora_ga_config=peft.LoraGAConfig(), fan_in_fan_out=True)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(0)  # GPT-2 has dropout, active while the gradients are estimated (train mode, as the reference)
    peftkit.preprocess_loraga(ours, cfg, _step(ours, batches))
    torch.manual_seed(0)
    peft.preprocess_loraga(theirs, ref_cfg, _step(theirs, batches))
    p_ours, p_ref = peftkit.get_peft_model(ours, cfg).eval(), peft.get_peft_model(theirs, ref_cfg).eval()
    ref_modules = dict(p_ref.named_modules())
    layers = [(n, m) for n, m in p_ours.named_modules() if isinstance(m, Linear)]
    assert len(layers) == 4
    for name, layer in layers:
        other = ref_modules[name]
        for attr in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, attr)["default"].weight, getattr(other, attr)["default"].weight,
                                       **FACTOR_TOL)
        torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight, **FACTOR_TOL)
    x = batches[0]
    torch.testing.assert_close(_out(p_ours, x), _out(base, x), **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    torch.testing.assert_close(_out(p_ours, x), _out(p_ref, x), atol=1e-5, rtol=0)


@pytest.mark.interop
def test_bfloat16_model_rounds_the_factors_before_the_residual_as_the_reference(exact_svd):
    """In a bfloat16 model A and B are rounded to bfloat16 before ``W - s * B @ A`` is computed (in float32), so
    the residual equals the reference's and the rounded factors reproduce W."""
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval().to(torch.bfloat16)
    batches = _batches()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    peftkit.preprocess_loraga(ours, _config(), _step(ours, batches))
    peft.preprocess_loraga(theirs, _config(peft), _step(theirs, batches))
    p_ours, p_ref = peftkit.get_peft_model(ours, _config()), peft.get_peft_model(theirs, _config(peft))
    ref_modules = dict(p_ref.named_modules())
    for name, layer in p_ours.named_modules():
        if isinstance(layer, Linear):
            other = ref_modules[name]
            A = layer.lora_A["default"].weight
            torch.testing.assert_close(A, A.to(torch.bfloat16).float(), atol=0, rtol=0)  # bfloat16 values
            torch.testing.assert_close(A, other.lora_A["default"].weight.float(), **FACTOR_TOL)
            # the residual is stored in bfloat16: one rounding of a float32 difference
            torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight,
                                       **fp_tol(torch.bfloat16, 1))


def test_a_cache_file_for_other_layers_is_refused_naming_the_field(tmp_path):
    base = tiny_llama().eval()
    path = str(tmp_path / "grads.pt")
    model = copy.deepcopy(base)
    peftkit.preprocess_loraga(model, _config(), _step(model, _batches(1)), cache_file=path)
    wider = peftkit.LoraConfig(r=R, target_modules=[*TARGETS, "k_proj"], init_lora_weights="lora_ga",
                               lora_ga_config=peftkit.LoraGAConfig())
    with pytest.raises(ConfigError, match="cache_file"):
        peftkit.preprocess_loraga(copy.deepcopy(base), wider, lambda: None, cache_file=path)
