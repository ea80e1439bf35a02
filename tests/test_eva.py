"""EVA (``init_lora_weights="eva"``, ``EvaConfig``, ``get_eva_state_dict``, ``initialize_lora_eva_weights``).

- the incremental PCA in ``peftkit.ops.incremental_pca`` against plain batch PCA, and its seeded randomized SVD
  against ``torch.linalg.svd`` / ``torch.svd_lowrank``;
- on a tiny Llama and a loader of a few batches of random token ids with padding: the reference's
  ``get_eva_state_dict`` and peftkit's choose the same rank per layer and span the same subspaces;
- ``initialize_lora_eva_weights``: ``lora_A`` rows are the components, the output is unchanged (``B = 0``), the config
  records the ranks as the reference's does, and the adapter loads in the reference and back with equal outputs;
- bad configs raise typed errors naming the field, where the reference raises the same builtin.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import HIDDEN, VOCAB, tiny_llama
from numerics import fp_tol

import peftkit
from peftkit.errors import ConfigError, ConfigTypeError
from peftkit.methods.lora.layers import Linear
from peftkit.ops.incremental_pca import (
    PCAState,
    incremental_pca_update,
    incremental_pca_update_reference,
    pca_reference,
    randomized_svd,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Subspaces are compared through their projectors P = U^T U (entries in [-1, 1]), which removes the sign and any
# rotation within the subspace. Both libraries run the same kernels here (float32 first step, then float64), but the
# components pass through several SVDs whose error grows as eps / (gap between singular values); 1e-5 is ~100
# float32 ulps at magnitude one, far below the O(1) change of a different subspace.
PROJ_TOL = 1e-5


def _loader(n_batches: int = 4, batch_size: int = 4, length: int = 16, seed: int = 0, labels: bool = False
            ) -> list[dict[str, torch.Tensor]]:
    """Random token ids; row 1 of each batch has 3 padding positions; with ``labels`` the first 2 positions are -100."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[1, -3:] = 0
        batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
        if labels:
            batch["labels"] = ids.masked_fill(mask == 0, -100).index_fill(1, torch.tensor([0, 1]), -100)
        batches.append(batch)
    return batches


def _configs(r: int = 4, eva: dict | None = None, **kw):
    eva = eva or {}
    ours = peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="eva",
                              eva_config=peftkit.EvaConfig(**eva), **kw)
    theirs = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="eva",
                             eva_config=peft.EvaConfig(**eva), **kw)
    return ours, theirs


def _projector(u: torch.Tensor) -> torch.Tensor:
    u = u.double()
    q = torch.linalg.qr(u.T).Q  # an orthonormal basis of the row space (whitened rows are not unit length)
    return q @ q.T


def _assert_same_eva(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    assert {k: v.shape[0] for k, v in ours.items()} == {k: v.shape[0] for k, v in theirs.items()}
    for name, u in theirs.items():
        if u.shape[0]:
            torch.testing.assert_close(_projector(ours[name]), _projector(u), atol=PROJ_TOL, rtol=0)


# ------------------------------------------------------------------------------------------------- the math


def test_incremental_pca_without_truncation_equals_batch_pca():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(20, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 3 for _ in range(4)]
    state = PCAState(n_components=6)
    for X in batches:
        state = incremental_pca_update_reference(state, X)
    everything = torch.cat(batches)
    components, S = pca_reference(everything, 6)
    # float64 throughout; a few SVDs of 6 columns: errors are O(1e-13)
    torch.testing.assert_close(state.components, components, atol=1e-10, rtol=0)
    torch.testing.assert_close(state.singular_values, S, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state.mean, everything.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(state.var, everything.var(0, unbiased=False), atol=1e-10, rtol=0)
    torch.testing.assert_close(state.explained_variance_ratio.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_randomized_update_finds_a_low_rank_subspace_exactly():
    """Data of rank 3 (plus an offset): the randomized update with k = 3 recovers the batch PCA's subspace."""
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(3, 24, generator=g)
    batches = [torch.randn(16, 3, generator=g) @ mix + 0.5 for _ in range(5)]
    state = PCAState(n_components=3)
    for X in batches:
        state = incremental_pca_update(state, X)
    components, S = pca_reference(torch.cat(batches), 3)
    # float32 first step on values of magnitude ~5: ~1e-6 relative, amplified by the SVDs' conditioning
    torch.testing.assert_close(_projector(state.components), _projector(components), atol=1e-5, rtol=0)
    torch.testing.assert_close(state.singular_values, S, atol=0, rtol=1e-4)


def test_randomized_svd_is_torch_svd_lowrank_with_a_private_seed():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(40, 30, generator=g) @ torch.diag(torch.logspace(0, -3, 30)) @ torch.randn(30, 30, generator=g)
    for M in (A, A.T):  # tall and wide
        state = torch.random.get_rng_state()
        U, S, Vh = randomized_svd(M, q=8, niter=4, seed=42)
        assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
        with torch.random.fork_rng():
            torch.manual_seed(42)
            U_ref, S_ref, V_ref = torch.svd_lowrank(M, q=8, niter=4)
        torch.testing.assert_close(S, S_ref, atol=0, rtol=1e-6)  # same kernels on the same draw
        _, S_full, Vh_full = torch.linalg.svd(M, full_matrices=False)
        torch.testing.assert_close(S[:4], S_full[:4], atol=0, rtol=1e-4)  # a fast-decaying spectrum: accurate
        torch.testing.assert_close(_projector(Vh[:4]), _projector(Vh_full[:4]), atol=1e-4, rtol=0)
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, U_ref @ torch.diag(S_ref) @ V_ref.T, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- against the reference


EVA_CASES = {
    "default": ({}, {}),
    "no-redistribution": ({"rho": 1.0}, {}),
    "rho3-label-mask": ({"rho": 3.0, "tau": 0.95}, {}),
    "rank-pattern": ({}, {"rank_pattern": {"o_proj": 2, "down_proj": 6}}),
}


@pytest.mark.parametrize("case", list(EVA_CASES))
def test_eva_state_dict_matches_reference_on_plain_model(case):
    eva, extra = EVA_CASES[case]
    ours_cfg, theirs_cfg = _configs(eva=eva, **extra)
    loader = _loader(labels=case == "rho3-label-mask")
    model = tiny_llama()
    theirs = peft.get_eva_state_dict(model, loader, peft_config=theirs_cfg, show_progress_bar=False)
    ours = peftkit.get_eva_state_dict(model, loader, peft_config=ours_cfg, show_progress_bar=False)
    _assert_same_eva(ours, theirs)
    ranks = {k: v.shape[0] for k, v in ours.items()}
    budget = sum(extra.get("rank_pattern", {}).get(k.rsplit(".", 1)[1], 4) for k in ranks)
    assert sum(ranks.values()) == budget  # the rank budget is handed out completely
    if case == "no-redistribution":
        assert all(r == 4 or "o_proj" in k or "down_proj" in k for k, r in ranks.items())
    else:
        assert len(set(ranks.values())) > 1  # the ranks were redistributed
    for u in ours.values():  # rows are orthonormal principal directions
        torch.testing.assert_close(u.double() @ u.double().T, torch.eye(u.shape[0], dtype=torch.float64),
                                   atol=1e-10, rtol=0)


def test_eva_state_dict_matches_reference_on_peft_models():
    ours_cfg, theirs_cfg = _configs()
    loader = _loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.get_peft_model(tiny_llama(), theirs_cfg)
    ours_model = peftkit.get_peft_model(tiny_llama(), ours_cfg)
    theirs = peft.get_eva_state_dict(theirs_model, loader, show_progress_bar=False)
    ours = peftkit.get_eva_state_dict(ours_model, loader, show_progress_bar=False)
    _assert_same_eva(ours, theirs)
    assert all(k.startswith("base_model.model.") for k in ours)


def test_whiten_divides_by_root_singular_values_once():
    """``whiten``: each layer's components divided by ``sqrt(S)``, once. The reference divides in place a view of the
    PCA state that layers with the same input (q/k/v, gate/up) share, so each of them ends up divided once per layer
    of its group (``S**-1.5`` for q/k/v); the layers with their own PCA (o_proj, down_proj) agree with it, and the
    directions agree everywhere (a difference on purpose, in the README)."""
    plain_cfg, _ = _configs()
    ours_cfg, theirs_cfg = _configs(eva={"whiten": True})
    model, loader = tiny_llama(), _loader()
    plain = peftkit.get_eva_state_dict(model, loader, peft_config=plain_cfg, show_progress_bar=False)
    ours = peftkit.get_eva_state_dict(model, loader, peft_config=ours_cfg, show_progress_bar=False)
    theirs = peft.get_eva_state_dict(model, loader, peft_config=theirs_cfg, show_progress_bar=False)
    unit = {k: v.norm(dim=1) for k, v in ours.items()}
    for name, u in ours.items():
        assert u.shape == plain[name].shape
        if u.shape[0]:  # each row is the unit component over sqrt(its singular value)
            torch.testing.assert_close(u / unit[name].view(-1, 1), plain[name], atol=1e-12, rtol=0)
        if name.endswith(("o_proj", "down_proj")):  # same float64 values from the same kernels
            torch.testing.assert_close(u, theirs[name], atol=1e-12, rtol=1e-9)
        elif u.shape[0]:
            torch.testing.assert_close(theirs[name] / theirs[name].norm(dim=1, keepdim=True), plain[name],
                                       atol=1e-12, rtol=0)
            assert (theirs[name].norm(dim=1) < 0.5 * u.norm(dim=1)).any()  # rows divided more than once there


def test_initialize_sets_components_and_records_ranks_as_reference(tmp_path):
    ours_cfg, theirs_cfg = _configs(eva={"rho": 2.0})
    loader = _loader()
    ours = peftkit.get_peft_model(tiny_llama(), ours_cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), theirs_cfg).eval()
    inputs = loader[0]
    base_out = ours(**inputs).logits
    components = peftkit.get_eva_state_dict(ours, loader, show_progress_bar=False)
    peftkit.initialize_lora_eva_weights(ours, eva_state_dict=dict(components))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(theirs, loader, show_progress_bar=False)
    # B = 0: the model output is unchanged by the initialisation (same kernels: exact)
    torch.testing.assert_close(ours(**inputs).logits, base_out, atol=0, rtol=0)  # B = 0: same base kernels
    for name, module in ours.named_modules():
        if isinstance(module, Linear):
            u = components[name]
            assert module.r["default"] == u.shape[0]
            torch.testing.assert_close(module.lora_A["default"].weight, u.float(), atol=0, rtol=0)  # a copy
            assert torch.count_nonzero(module.lora_B["default"].weight) == 0
            assert module.lora_A["default"].weight.requires_grad
            scaling = ours_cfg.lora_alpha * u.shape[0] / ours_cfg.r / u.shape[0]  # adjust_scaling_factors
            assert module.scaling["default"] == pytest.approx(scaling)
    ours_saved = ours.peft_config["default"]
    theirs_saved = theirs.peft_config["default"]
    assert ours_saved.rank_pattern == theirs_saved.rank_pattern and ours_saved.rank_pattern
    assert ours_saved.alpha_pattern == pytest.approx(theirs_saved.alpha_pattern)
    assert set(ours_saved.target_modules) == set(theirs_saved.target_modules)
    assert ours_cfg.rank_pattern == {}  # the user's config object is untouched
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("eva_config", "rank_pattern", "alpha_pattern", "init_lora_weights", "r", "lora_alpha"):
        assert ours_json[key] == pytest.approx(theirs_json[key]), key


def _randomize_B(model: torch.nn.Module) -> None:
    """Non-zero ``lora_B`` so that the adapter changes the output (interop is then a real check)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_eva_adapter_interop_both_ways(tmp_path):
    loader = _loader()
    inputs = loader[1]
    # peftkit -> reference
    ours_cfg, theirs_cfg = _configs(eva={"rho": 2.0})
    ours = peftkit.get_peft_model(tiny_llama(), ours_cfg)
    peftkit.initialize_lora_eva_weights(ours, loader, show_progress_bar=False)
    _randomize_B(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    # float32, reductions over at most FFN (64) terms per layer, two decoder layers and the head
    tol = fp_tol(torch.float32, 4 * 64 + HIDDEN)
    with torch.no_grad():
        expected = ours(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, **tol)
        assert not torch.allclose(tiny_llama()(**inputs).logits, expected, atol=1e-3)  # the adapter does something
    # reference -> peftkit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), theirs_cfg)
        peft.initialize_lora_eva_weights(theirs, loader, show_progress_bar=False)
    _randomize_B(theirs)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    back = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, theirs(**inputs).logits, **tol)
    assert back.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern


def test_eva_adapter_saves_loads_and_merges_in_peftkit(tmp_path):
    """The conformance properties on an EVA-initialised adapter with redistributed ranks: save/load round trip and
    merge (``W + s·B@A``) against the unmerged forward."""
    loader = _loader()
    inputs = loader[2]
    ours_cfg, _ = _configs(eva={"rho": 2.0})
    model = peftkit.get_peft_model(tiny_llama(), ours_cfg)
    peftkit.initialize_lora_eva_weights(model, loader, show_progress_bar=False)
    _randomize_B(model)
    model.eval().save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ranks = {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, Linear)}
    assert ranks == {n: m.r["default"] for n, m in loaded.named_modules() if isinstance(m, Linear)}
    assert len(set(ranks.values())) > 1
    tol = fp_tol(torch.float32, 4 * 64 + HIDDEN)  # as in the interop test: another summation order (merged W)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)  # same weights, same kernels
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expected, **tol)


def test_rank_zero_layers_lose_their_lora_layer_as_in_reference(tmp_path):
    """With a large ``rho`` and r = 1 some layers receive no component: their LoRA layer is removed and
    ``target_modules`` no longer names them, as in the reference."""
    ours_cfg, theirs_cfg = _configs(r=1, eva={"rho": 6.0})
    loader = _loader()
    ours = peftkit.get_peft_model(tiny_llama(), ours_cfg)
    peftkit.initialize_lora_eva_weights(ours, loader, show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), theirs_cfg)
        peft.initialize_lora_eva_weights(theirs, loader, show_progress_bar=False)

    def layers(model, cls):
        return {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
                if isinstance(m, cls)}

    ours_layers = layers(ours, Linear)
    assert ours_layers == layers(theirs, peft.tuners.lora.layer.Linear)
    assert len(ours_layers) < 2 * len(TARGETS)  # some layers were removed
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert layers(loaded, peft.tuners.lora.layer.Linear) == ours_layers


def test_meta_placeholders_and_layers_eva_does_not_cover():
    """With ``low_cpu_mem_usage=True`` the placeholders are on meta and EVA creates them; an embedding target gets
    the default init (warned, as the reference), and the output is still the base model's."""
    loader = _loader()
    config = peftkit.LoraConfig(r=4, target_modules=[*TARGETS, "embed_tokens"], init_lora_weights="eva",
                                eva_config=peftkit.EvaConfig())
    model = peftkit.get_peft_model(tiny_llama(), config, low_cpu_mem_usage=True)
    assert any(p.is_meta for n, p in model.named_parameters() if "lora_A" in n)
    with pytest.warns(UserWarning, match="model.embed_tokens"):
        peftkit.initialize_lora_eva_weights(model, loader, show_progress_bar=False)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():  # every LoRA update is zero at init (B = 0; the embedding's A = 0): exact
        torch.testing.assert_close(model(**loader[0]).logits, tiny_llama()(**loader[0]).logits, atol=0,
                                   rtol=0)  # zero updates on the same base kernels
    assert "model.embed_tokens" in model.peft_config["default"].target_modules


def test_progress_bar_reports_converged_layers(capsys):
    ours_cfg, _ = _configs()
    peftkit.get_eva_state_dict(tiny_llama(), _loader(), peft_config=ours_cfg, show_progress_bar=True)
    assert "layers have converged" in capsys.readouterr().err


def test_loader_is_reiterated_not_cached():
    """The loader is iterated again for each pass (nothing kept between passes, unlike ``itertools.cycle``)."""

    class Loader:
        def __init__(self, batches):
            self.batches, self.iterations = batches, 0

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            self.iterations += 1
            return iter(self.batches)

    ours_cfg, _ = _configs(eva={"tau": 0.999})
    loader = Loader(_loader(n_batches=2))
    peftkit.get_eva_state_dict(tiny_llama(), loader, peft_config=ours_cfg, show_progress_bar=False)
    assert loader.iterations > 2  # the first batch's pass, then several passes over the two batches


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "field", "error"), [
    ({"rho": 0.5}, "rho", ConfigError),
    ({"tau": 1.5}, "tau", ConfigError),
    ({"tau": -0.1}, "tau", ConfigError),
])
def test_bad_eva_config_names_the_field(kwargs, field, error):
    with pytest.raises(error) as info:
        peftkit.EvaConfig(**kwargs)
    assert info.value.field == field and field in str(info.value)
    with pytest.raises(ValueError):  # the reference's builtin
        peft.EvaConfig(**kwargs)
    with pytest.raises(error) as info:  # also when it arrives as a dict (a loaded adapter_config.json)
        peftkit.LoraConfig(init_lora_weights="eva", eva_config=kwargs)
    assert info.value.field == field


def test_eva_config_of_wrong_type():
    with pytest.raises(ConfigTypeError) as info:
        peftkit.LoraConfig(init_lora_weights="eva", eva_config=5)
    assert info.value.field == "eva_config"
    with pytest.raises(TypeError):
        peft.LoraConfig(init_lora_weights="eva", eva_config=5)
    with pytest.raises(ConfigTypeError) as info:
        peftkit.EvaConfig(rho="2")
    assert info.value.field == "rho"


def test_eva_config_defaults_and_json_round_trip(tmp_path):
    with pytest.warns(UserWarning, match="eva_config"):
        config = peftkit.LoraConfig(init_lora_weights="eva")
    assert config.eva_config == peftkit.EvaConfig()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["eva_config"] == {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                  "whiten": False, "adjust_scaling_factors": True}
    assert peftkit.LoraConfig.from_pretrained(tmp_path).eva_config == config.eva_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peft.LoraConfig.from_pretrained(tmp_path).eva_config == peft.EvaConfig()


def test_initialize_rejects_bad_calls():
    model = tiny_llama()
    with pytest.raises(ConfigError) as info:
        peftkit.initialize_lora_eva_weights(model, _loader())
    assert info.value.field == "model"
    plain = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ConfigError) as info:
        peftkit.initialize_lora_eva_weights(plain, _loader())
    assert info.value.field == "init_lora_weights"
    ours_cfg, _ = _configs()
    eva_model = peftkit.get_peft_model(tiny_llama(), ours_cfg)
    with pytest.raises(ConfigError) as info:
        peftkit.initialize_lora_eva_weights(eva_model)
    assert info.value.field == "dataloader"
    with pytest.raises(ConfigError) as info:
        peftkit.get_eva_state_dict(eva_model, [])
    assert info.value.field == "dataloader"
    with pytest.raises(ConfigError) as info:
        peftkit.get_eva_state_dict(tiny_llama(), _loader())
    assert info.value.field == "peft_config"
    tiny = _loader(n_batches=2, batch_size=2, length=4)  # 4 + 1 real tokens per batch, 8 components per layer
    with pytest.raises(ConfigError) as info:  # the reference loops forever here
        peftkit.get_eva_state_dict(tiny_llama(), tiny, peft_config=ours_cfg, show_progress_bar=False)
    assert info.value.field == "dataloader"
    unused = peftkit.LoraConfig(r=4, target_modules=["q_proj", "lm_head", "score"], init_lora_weights="eva",
                                eva_config=peftkit.EvaConfig())
    model = tiny_llama()
    model.score = torch.nn.Linear(HIDDEN, 2)  # a targeted layer the forward never calls
    with pytest.raises(ConfigError) as info:
        peftkit.get_eva_state_dict(model, _loader(), peft_config=unused, show_progress_bar=False)
    assert info.value.field == "target_modules" and "score" in str(info.value)
    with pytest.raises(ConfigError) as info:
        peftkit.get_eva_state_dict(tiny_llama(), _loader(), peft_config=ours_cfg,
                                   prepare_layer_inputs_fn={"no.such.layer": lambda *a: None})
    assert info.value.field == "prepare_layer_inputs_fn"
