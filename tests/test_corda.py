"""CorDA (``init_lora_weights="corda"``, ``CordaConfig``, ``preprocess_corda``): the streamed input covariance and
the decomposition match a plain implementation and the reference's preprocessing; the model's output is unchanged
at init (the base holds the residual); adapters round-trip between the libraries on the residual base and convert
to plain LoRA on the original base (``path_initial_model_for_weight_conversion``) as the reference does; bad
configs raise typed errors naming the field."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError, ConfigTypeError
from peftkit.methods.lora.layers import Linear
from peftkit.ops.datainit import accumulate_covariance_, covariance_reference
from tests.models import tiny_llama
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

TARGETS = ["q_proj", "v_proj", "down_proj"]
SEQ = 8


def _batches(n: int = 8, batch: int = 1, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (batch, SEQ), generator=g) for _ in range(n)]


def _config(lib=peftkit, method: str = "ipm", **kw):
    corda_cls = peftkit.CordaConfig if lib is peftkit else _reference_corda().CordaConfig
    corda_kw = {k: kw.pop(k) for k in ("cache_file", "covariance_file") if k in kw}
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                          corda_config=corda_cls(corda_method=method, **corda_kw), **kw)


def _reference_corda():
    """The reference's ``peft.tuners.lora.corda`` module. It imports ``attr.dataclass`` (the ``attrs`` package,
    which the reference does not declare as a dependency and this environment lacks); for its plain three-field
    record ``attr.dataclass`` behaves as ``dataclasses.dataclass``, so a stand-in is installed when needed."""
    pytest.importorskip("peft")
    try:
        import attr  # noqa: F401
    except ImportError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)  # type: ignore[assignment]
    import peft.tuners.lora.config
    import peft.tuners.lora.corda

    peft.tuners.lora.corda.CordaConfig = peft.tuners.lora.config.CordaConfig
    return peft.tuners.lora.corda


def _run(model, batches):
    return lambda: [model(input_ids=b) for b in batches]


def _out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _eigens(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {n: (m.eigens.U_WC, m.eigens.S_WC, m.eigens.V_WC) for n, m in model.named_modules() if hasattr(m, "eigens")}


#: the decomposition's float32 reductions: the covariance sums 8 samples x 8 tokens, the SVD / inverse work on
#: (out, in) matrices of the tiny model (<= 64 wide); a loose factor covers the SVD's iterative rounding
DECOMP_TOL = fp_tol(torch.float32, 8 * SEQ + 64, factor=16)


# ------------------------------------------------------------------------------------------------ math


def test_batched_covariance_matches_per_sample_plain_reference():
    """The fast path (one addmm over all samples of a batch, each divided by its own max) equals the plain
    per-sample loop; the count is the number of samples."""
    torch.manual_seed(0)
    x = torch.randn(5, 7, 16)
    acc = torch.zeros(16, 16)
    assert accumulate_covariance_(acc, x) == 5
    assert accumulate_covariance_(acc, x[0]) == 1  # (T, in): one sample
    expected = covariance_reference([*x, x[0]])
    # float32 sums of 6 * 7 products per element, in another order
    torch.testing.assert_close(acc / 6, expected, **fp_tol(torch.float32, 6 * 7))


def test_corda_follows_its_definition_on_a_plain_implementation():
    """For one layer: ``C`` = mean over samples of ``X^T X / max(X)^2``, damped as the reference; ``W C = U S V_h``;
    ``s * B @ A = U_r S_r (V_h C^-1)_r`` (IPM: the top ``r``) and the base holds ``W - s * B @ A``."""
    base = tiny_llama().eval()
    batches = _batches()
    seen: list[torch.Tensor] = []
    layer = base.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(a[0][0].detach().clone()))
    W = layer.weight.detach().clone()
    model = copy.deepcopy(base)
    peftkit.preprocess_corda(model, _config(), _run(model, batches))
    handle.remove()
    C = sum((X / X.max().abs()).t() @ (X / X.max().abs()) for X in seen) / len(seen)
    damp = 0.01
    while True:  # the reference's damping rule, written out
        Cd = C + torch.eye(32) * C.diag().mean() * damp
        inv = torch.linalg.inv(Cd)
        if torch.dist(Cd @ inv, torch.eye(32)) < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ Cd)
    expected_delta = U[:, :4] @ torch.diag(S[:4]) @ (Vh[:4] @ inv)
    peft_model = peftkit.get_peft_model(model, _config())
    wrapped = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(wrapped, Linear)
    A, B, s = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight, wrapped.scaling["default"]
    torch.testing.assert_close(s * B @ A, expected_delta, **DECOMP_TOL)
    torch.testing.assert_close(wrapped.get_base_layer().weight, W - s * B @ A, **DECOMP_TOL)


def test_batches_of_several_sequences_give_the_per_sequence_result():
    """Batching is a speed choice: batches of 4 sequences give the covariance of the same 8 sequences run one by
    one (each sequence normalised by its own max), and an iterable of batches is streamed like a callable."""
    base = tiny_llama().eval()
    single = _batches(8, 1)
    grouped = [torch.cat(single[i:i + 4]) for i in (0, 4)]
    one, four = copy.deepcopy(base), copy.deepcopy(base)
    peftkit.preprocess_corda(one, _config(), _run(one, single))
    peftkit.preprocess_corda(four, _config(), [{"input_ids": b} for b in grouped])
    e1, e4 = _eigens(one), _eigens(four)
    assert e1.keys() == e4.keys() and len(e1) == 6
    for name in e1:
        (U1, S1, V1), (U4, S4, V4) = e1[name], e4[name]
        torch.testing.assert_close(S4, S1, **DECOMP_TOL)
        torch.testing.assert_close(U4 @ torch.diag(S4) @ V4.t(), U1 @ torch.diag(S1) @ V1.t(), **DECOMP_TOL)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_identity_at_init_and_base_holds_the_residual(method):
    base = tiny_llama().eval()
    x = _batches(1, 2, seed=5)[0]
    expected = _out(base, x)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.split(".")[-1] in TARGETS}
    model = copy.deepcopy(base)
    peftkit.preprocess_corda(model, _config(method=method), _run(model, _batches()))
    peft_model = peftkit.get_peft_model(model, _config(method=method)).eval()
    # the residual W - s*B@A plus s*B@A rounds once per weight element; outputs are of order one
    torch.testing.assert_close(_out(peft_model, x), expected, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, Linear)]
    assert len(layers) == 6
    merged = copy.deepcopy(peft_model).merge_and_unload()  # merging W_res + s*B@A gives back W's outputs
    torch.testing.assert_close(_out(merged, x), expected, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    for name, layer in layers:
        W = originals[name.removeprefix("base_model.model.")]
        assert not hasattr(layer.get_base_layer(), "eigens")  # consumed by the init, as the reference
        assert not torch.allclose(layer.get_base_layer().weight, W)
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        torch.testing.assert_close(layer.get_base_layer().weight + s * B @ A, W, **fp_tol(torch.float32, 4))


# ------------------------------------------------------------------------------------------ the reference


@pytest.mark.interop
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_preprocessing_and_init_match_the_reference(method, tmp_path):
    """Same calibration batches in both libraries: equal covariances (the files they write), equal eigens (the
    subspaces, compared through ``U S V^T``, which is invariant to the SVD's signs and rotations), equal residual
    base weights and adapter products, equal outputs."""
    ref_corda = _reference_corda()
    import peft

    base = tiny_llama().eval()
    batches = _batches()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    cfg = _config(method=method, covariance_file=str(tmp_path / "ours" / "cov.pt"))
    ref_cfg = _config(peft, method=method, covariance_file=str(tmp_path / "ref" / "cov.pt"))
    peftkit.preprocess_corda(ours, cfg, _run(ours, batches))
    ref_corda.preprocess_corda(theirs, ref_cfg, _run(theirs, batches))
    cov_ours, cov_ref = torch.load(tmp_path / "ours" / "cov.pt"), torch.load(tmp_path / "ref" / "cov.pt")
    assert cov_ours.keys() == cov_ref.keys() and len(cov_ours) == 6
    for name in cov_ours:  # float32 sums over 8 samples x 8 tokens
        torch.testing.assert_close(cov_ours[name], cov_ref[name], **fp_tol(torch.float32, 8 * SEQ))
    e_ours, e_ref = _eigens(ours), _eigens(theirs)
    for name in e_ours:
        (U1, S1, V1), (U2, S2, V2) = e_ours[name], e_ref[name]
        assert U1.shape == U2.shape and V1.shape == V2.shape
        torch.testing.assert_close(S1, S2, **DECOMP_TOL)
        torch.testing.assert_close(U1 @ torch.diag(S1) @ V1.t(), U2 @ torch.diag(S2) @ V2.t(), **DECOMP_TOL)
    p_ours = peftkit.get_peft_model(ours, cfg).eval()
    p_ref = peft.get_peft_model(theirs, ref_cfg).eval()
    ref_modules = dict(p_ref.named_modules())
    for name, layer in p_ours.named_modules():
        if not isinstance(layer, Linear):
            continue
        other = ref_modules[name]
        torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight, **DECOMP_TOL)
        ours_delta = layer.get_delta_weight("default")
        torch.testing.assert_close(ours_delta, other.get_delta_weight("default"), **DECOMP_TOL)
    x = batches[0]
    torch.testing.assert_close(_out(p_ours, x), _out(p_ref, x), atol=1e-5, rtol=0)
    saved = {lib.__name__: m for lib, m in ((peftkit, p_ours), (peft, p_ref))}
    for name, model in saved.items():
        model.save_pretrained(tmp_path / name)
    configs = [json.loads((tmp_path / n / "adapter_config.json").read_text())["corda_config"] for n in saved]
    for corda in configs:
        assert corda.pop("covariance_file").endswith("cov.pt")  # the two runs wrote to different paths
    assert configs[0] == configs[1]


@pytest.mark.interop
def test_cache_files_are_read_by_the_other_library(tmp_path):
    """``cache_file`` uses the reference's format: a cache written by either library initialises the other
    without running the model (``run_model=None``), to the same adapter."""
    ref_corda = _reference_corda()
    import peft

    base = tiny_llama().eval()
    batches = _batches()
    writers = {"peftkit": (peftkit, peftkit.preprocess_corda), "peft": (peft, ref_corda.preprocess_corda)}
    for writer, (lib, preprocess) in writers.items():
        path = str(tmp_path / writer / "cache.pt")
        model = copy.deepcopy(base)
        preprocess(model, _config(lib, cache_file=path), _run(model, batches))
        expected = peftkit.get_peft_model(model, _config(cache_file=path)) if lib is peftkit else \
            peft.get_peft_model(model, _config(peft, cache_file=path))
        for reader, (rlib, rpreprocess) in writers.items():
            fresh = copy.deepcopy(base)
            rpreprocess(fresh, _config(rlib, cache_file=path), None)
            loaded = rlib.get_peft_model(fresh, _config(rlib, cache_file=path))
            x = batches[1]
            torch.testing.assert_close(_out(loaded.eval(), x), _out(expected.eval(), x), atol=1e-5, rtol=0,
                                       msg=f"cache by {writer}, read by {reader}")


def _train(model, batches, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        opt.zero_grad()
        model(input_ids=batches[step], labels=batches[step]).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.interop
def test_adapters_round_trip_between_the_libraries_on_the_residual_base(tmp_path):
    """The reference's recipe without conversion: after training, save the adapter with ``init_lora_weights=True``
    (loading must not decompose again) and the residual base; either library's adapter loads in the other on that
    base with the same outputs (1e-5)."""
    ref_corda = _reference_corda()
    import peft

    base = tiny_llama().eval()
    batches = _batches()
    x = batches[-1]
    results = {}
    for lib, preprocess in ((peftkit, peftkit.preprocess_corda), (peft, ref_corda.preprocess_corda)):
        model = copy.deepcopy(base)
        preprocess(model, _config(lib), _run(model, batches))
        peft_model = lib.get_peft_model(model, _config(lib))
        _train(peft_model, batches)
        out = _out(peft_model, x)
        peft_model.save_pretrained(tmp_path / f"{lib.__name__}_as_is")
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(tmp_path / lib.__name__)
        residual = copy.deepcopy(peft_model).unload().state_dict()
        results[lib.__name__] = (out, residual)
    for saver in results:  # saved as is, loading would decompose again: both libraries refuse (no eigens)
        for lib in (peftkit, peft):
            with pytest.raises(ValueError, match="preprocess_corda"):
                lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"{saver}_as_is")
    for saver, (out, residual) in results.items():
        for lib in (peftkit, peft):
            fresh = copy.deepcopy(base)
            fresh.load_state_dict(residual)
            loaded = lib.PeftModel.from_pretrained(fresh, tmp_path / saver).eval()
            torch.testing.assert_close(_out(loaded, x), out, atol=1e-5, rtol=0, msg=f"{saver} -> {lib.__name__}")


@pytest.mark.interop
def test_conversion_to_plain_lora_on_the_original_base_matches_the_reference(tmp_path):
    """``save_pretrained(path_initial_model_for_weight_conversion=...)``: a rank-2r plain LoRA applying to the
    ORIGINAL base reproduces the trained CorDA model in both libraries, and equals the reference's conversion of
    the same tensors."""
    ref_corda = _reference_corda()
    import peft
    from safetensors.torch import load_file

    base = tiny_llama().eval()
    batches = _batches()
    x = batches[-1]
    model = copy.deepcopy(base)
    peftkit.preprocess_corda(model, _config(), _run(model, batches))
    ours = peftkit.get_peft_model(model, _config())
    ours.save_pretrained(tmp_path / "initial")
    theirs_model = copy.deepcopy(base)
    ref_corda.preprocess_corda(theirs_model, _config(peft), _run(theirs_model, batches))
    theirs = peft.get_peft_model(theirs_model, _config(peft))
    theirs.save_pretrained(tmp_path / "ref_initial")
    _train(ours, batches)
    trained = _out(ours, x)
    assert (trained - _out(base, x)).abs().max() > 1e-3  # training moved the outputs
    ours.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    for lib in (peftkit, peft):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted").eval()
        torch.testing.assert_close(_out(loaded, x), trained, atol=1e-5, rtol=0)
    peft.set_peft_model_state_dict(theirs, peftkit.get_peft_model_state_dict(ours))
    # the reference's converter loads "initial" onto the residual model: give it ours, so both convert the same
    theirs.save_pretrained(tmp_path / "ref_converted",
                           path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("converted", "ref_converted"))
    assert a.keys() == b.keys()
    for key in a:  # concatenation and negation: element-wise
        torch.testing.assert_close(a[key], b[key], **fp_tol(torch.float32, 1))


# ------------------------------------------------------------------------------------------------ errors


def test_bad_configs_raise_typed_errors_naming_the_field():
    with pytest.raises(ConfigError, match="corda_config.corda_method"):
        peftkit.CordaConfig(corda_method="xpm")
    with pytest.raises(ConfigError, match="corda_config"):
        peftkit.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "ipm", "bogus": 1})
    with pytest.raises(ConfigTypeError, match="corda_config"):
        peftkit.LoraConfig(init_lora_weights="corda", corda_config=5)
    with pytest.raises(ConfigTypeError, match="corda_config.verbose"):
        peftkit.CordaConfig(verbose="yes")
    with pytest.warns(peftkit.PeftWarning, match="corda_config"):
        cfg = peftkit.LoraConfig(init_lora_weights="corda", target_modules=TARGETS)
    assert cfg.corda_config == peftkit.CordaConfig()  # as the reference: the default config, warned
    loaded = peftkit.LoraConfig.from_dict({**cfg.to_dict(), "corda_config": {"corda_method": "kpm"}})
    assert loaded.corda_config == peftkit.CordaConfig(corda_method="kpm")


def test_preprocess_and_init_errors_name_the_cause(tmp_path):
    base = tiny_llama().eval()
    with pytest.raises(ConfigError, match="init_lora_weights"):
        peftkit.preprocess_corda(copy.deepcopy(base), peftkit.LoraConfig(target_modules=TARGETS), lambda: None)
    with pytest.raises(ConfigError, match="run_model"):
        peftkit.preprocess_corda(copy.deepcopy(base), _config(), None)
    with pytest.raises(ConfigError, match="run_model"):  # a callable that never runs the model
        peftkit.preprocess_corda(copy.deepcopy(base), _config(), lambda: None)
    with pytest.raises(ConfigError, match="preprocess_corda"):  # no eigens: get_peft_model cannot decompose
        peftkit.get_peft_model(copy.deepcopy(base), _config())
    model = copy.deepcopy(base)
    peftkit.preprocess_corda(model, _config(), _run(model, _batches(2)))
    with pytest.raises(ConfigError, match="r=2"):  # eigens built for r=4
        peftkit.get_peft_model(model, _config().copy(r=2, lora_alpha=4))


@pytest.mark.interop
def test_gpt2_conv1d_layers_match_the_reference():
    """GPT-2's ``Conv1D`` stores its weight ``(in, out)``: the decomposition works on ``(out, in)`` and the residual
    is written back transposed, as the reference; outputs unchanged at init."""
    ref_corda = _reference_corda()
    import peft

    from tests.models import tiny_gpt2

    base = tiny_gpt2().eval()
    batches = _batches(8, 1)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    cfg = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="corda",
                             corda_config=peftkit.CordaConfig())
    ref_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="corda",
                              corda_config=_reference_corda().CordaConfig(), fan_in_fan_out=True)
    peftkit.preprocess_corda(ours, cfg, _run(ours, batches))
    ref_corda.preprocess_corda(theirs, ref_cfg, _run(theirs, batches))
    p_ours, p_ref = peftkit.get_peft_model(ours, cfg).eval(), peft.get_peft_model(theirs, ref_cfg).eval()
    ref_modules = dict(p_ref.named_modules())
    for name, layer in p_ours.named_modules():
        if isinstance(layer, Linear):
            other = ref_modules[name]
            torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight, **DECOMP_TOL)
            torch.testing.assert_close(layer.get_delta_weight("default"), other.get_delta_weight("default"),
                                       **DECOMP_TOL)
    x = batches[0]
    torch.testing.assert_close(_out(p_ours, x), _out(base, x), **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    torch.testing.assert_close(_out(p_ours, x), _out(p_ref, x), atol=1e-5, rtol=0)


def test_a_cache_file_for_other_layers_is_refused_naming_the_field(tmp_path):
    base = tiny_llama().eval()
    path = str(tmp_path / "cache.pt")
    model = copy.deepcopy(base)
    peftkit.preprocess_corda(model, _config(cache_file=path), _run(model, _batches(2)))
    wider = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=[*TARGETS, "k_proj"], init_lora_weights="corda",
                               corda_config=peftkit.CordaConfig(cache_file=path))
    with pytest.raises(ConfigError, match="corda_config.cache_file"):
        peftkit.preprocess_corda(copy.deepcopy(base), wider, None)
