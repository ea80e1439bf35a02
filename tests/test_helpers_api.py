"""The helper API (``peftkit.helpers``, the registry views, ``peftkit.optimizers``) against the reference 0.21.2.

Each test builds the same tiny model twice (seeded), wraps one with the reference and one with peftkit, copies the
adapter weights across where outputs are compared, and checks the same results and the same error classes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import helpers as pk_helpers
from peftkit import optimizers as pk_opt
from tests.models import MLP, EmbModel, tiny_llama

peft = pytest.importorskip("peft")
from peft import helpers as ref_helpers
from peft import optimizers as ref_opt

torch.set_num_threads(1)


def _pair(build, **cfg):
    """(reference PeftModel, peftkit PeftModel) of two identical copies of ``build()``, same adapter weights."""
    base = build()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**cfg))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    return ref, ours


def _mlp():
    torch.manual_seed(0)
    return MLP()


def _llama_cfg():
    return {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"], "lora_dropout": 0.0}


# ---------------------------------------------------------------------- base model state dict
@pytest.mark.parametrize("build,cfg", [
    (_mlp, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (tiny_llama, _llama_cfg()),
])
def test_get_base_model_state_dict_matches_reference(build, cfg):
    ref, ours = _pair(build, **cfg)
    want, got = peft.get_base_model_state_dict(ref), peftkit.get_base_model_state_dict(ours)
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key  # same base tensors, copied: exact


def test_base_state_dict_round_trip_and_strict_errors():
    ref, ours = _pair(tiny_llama, **_llama_cfg())
    state = peftkit.get_base_model_state_dict(ours)
    fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    result = peftkit.set_base_model_state_dict(ours, fresh)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(peftkit.get_base_model_state_dict(ours)[k], fresh[k]) for k in fresh)
    bad = dict(fresh)
    bad.pop("model.norm.weight")
    bad["nope.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as ours_err:
        peftkit.set_base_model_state_dict(ours, bad)
    with pytest.raises(RuntimeError) as ref_err:
        peft.set_base_model_state_dict(ref, bad)
    assert str(ours_err.value) == str(ref_err.value)
    assert tuple(peftkit.set_base_model_state_dict(ours, bad, strict=False)) == tuple(
        peft.set_base_model_state_dict(ref, bad, strict=False))


def test_base_state_dict_rejects_plain_module():
    with pytest.raises(TypeError):
        peftkit.get_base_model_state_dict(MLP())


# ---------------------------------------------------------------------- small helpers
def test_check_if_peft_model(tmp_path):
    _, ours = _pair(_mlp, target_modules=["lin0"])
    ours.save_pretrained(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "a", tmp_path / "empty", tmp_path / "missing"):
        assert pk_helpers.check_if_peft_model(str(path)) == ref_helpers.check_if_peft_model(str(path))
    assert pk_helpers.check_if_peft_model(str(tmp_path / "a"))


def test_rescale_adapter_scale_matches_reference():
    ref, ours = _pair(_mlp, target_modules=["lin0", "lin1"])
    ref.eval(), ours.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        before = ours(x)  # also builds any cached inference plan, which the context must not reuse
        with ref_helpers.rescale_adapter_scale(ref, 0.5):
            want = ref(x)
        with pk_helpers.rescale_adapter_scale(ours, 0.5):
            got = ours(x)
        # different kernels over reductions of length <= 20 in float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, before)
        torch.testing.assert_close(ours(x), before, rtol=0, atol=0)  # restored exactly
    layer = ours.base_model.model.lin0
    assert layer.scaling == ref.base_model.model.lin0.scaling


def test_rescale_adapter_scale_restores_after_error_and_raises_like_reference():
    ref, ours = _pair(_mlp, target_modules=["lin0"])
    scaling = dict(ours.base_model.model.lin0.scaling)
    with pytest.raises(KeyError), pk_helpers.rescale_adapter_scale(ours, 2):
        raise KeyError("boom")
    assert ours.base_model.model.lin0.scaling == scaling
    for bad, exc in (("0.5", TypeError), (None, TypeError)):
        with pytest.raises(exc), ref_helpers.rescale_adapter_scale(ref, bad):
            pass
        with pytest.raises(exc), pk_helpers.rescale_adapter_scale(ours, bad):
            pass
    with pytest.raises(ValueError), ref_helpers.rescale_adapter_scale(MLP(), 0.5):
        pass
    with pytest.raises(ValueError, match="LoraLayer"), pk_helpers.rescale_adapter_scale(MLP(), 0.5):
        pass


def test_disable_input_dtype_casting_flags():
    _, ours = _pair(_mlp, target_modules=["lin0", "lin1"])
    layers = [m for m in ours.modules() if isinstance(m, peftkit.BaseTunerLayer)]
    with pk_helpers.disable_input_dtype_casting(ours, active=False):
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)
    with pk_helpers.disable_input_dtype_casting(ours):
        assert not any(m.cast_input_dtype_enabled for m in layers)
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)


def test_disable_input_dtype_casting_leaves_input_dtype():
    """With float32 adapters on a bfloat16 base, the reference casts the bf16 input to float32 before lora_A;
    inside the context it passes the bf16 input through (a hook on lora_A sees its dtype)."""
    for model in _pair(_mlp, target_modules=["lin0"]):
        model.eval()
        model.base_model.model.lin0.base_layer.to(torch.bfloat16)
        seen = []
        hook = model.base_model.model.lin0.lora_A["default"].register_forward_pre_hook(
            lambda mod, args, seen=seen: (seen.append(args[0].dtype), (args[0].float(),))[1])
        x = torch.randn(2, 10, dtype=torch.bfloat16)
        with torch.no_grad():
            model.base_model.model.lin0(x)
            with pk_helpers.disable_input_dtype_casting(model) if isinstance(model, peftkit.PeftModel) \
                    else ref_helpers.disable_input_dtype_casting(model):
                model.base_model.model.lin0(x)
        hook.remove()
        assert seen == [torch.float32, torch.bfloat16], type(model)


def test_cast_mixed_precision_params_matches_reference():
    ref, ours = _pair(tiny_llama, **_llama_cfg())
    peft.cast_mixed_precision_params(ref, torch.bfloat16)
    params = {n: p for n, p in ours.named_parameters()}
    peftkit.cast_mixed_precision_params(ours, torch.bfloat16)
    want = {n: (p.dtype, p.requires_grad) for n, p in ref.named_parameters()}
    got = {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    assert got == want
    assert all(p is params[n] for n, p in ours.named_parameters())  # same Parameter objects
    with pytest.raises(TypeError):
        peftkit.cast_mixed_precision_params(ours, "bf16")


def test_shift_tokens_right_matches_reference():
    ids = torch.tensor([[5, 6, 7, -100], [8, -100, 9, 10]])
    torch.testing.assert_close(peftkit.shift_tokens_right(ids, 0, 2), peft.shift_tokens_right(ids, 0, 2),
                               rtol=0, atol=0)  # integer token ids
    with pytest.raises(ValueError):
        peft.shift_tokens_right(ids, None, 2)
    with pytest.raises(ValueError, match="pad_token_id"):
        peftkit.shift_tokens_right(ids, None, 2)


# ---------------------------------------------------------------------- registry views
def test_registry_views_match_reference():
    cfg, tuner, mixed = (peftkit.PEFT_TYPE_TO_CONFIG_MAPPING, peftkit.PEFT_TYPE_TO_TUNER_MAPPING,
                         peftkit.PEFT_TYPE_TO_MIXED_MODEL_MAPPING)
    assert set(cfg) == {spec.peft_type for spec in peftkit.all_methods()}
    assert {str(k) for k in cfg} <= {k.value for k in peft.PEFT_TYPE_TO_CONFIG_MAPPING}
    for key, config_cls in cfg.items():
        assert config_cls.__name__ == peft.PEFT_TYPE_TO_CONFIG_MAPPING[key.value].__name__
        assert cfg[str(key)] is config_cls  # str keys work, as with the reference's str-enum keys
    assert set(tuner) == set(cfg)
    for key in ("LORA", "IA3", "LOHA", "LOKR", "ADALORA"):
        assert tuner[key].__name__ == peft.PEFT_TYPE_TO_TUNER_MAPPING[key].__name__
    assert tuner["LORA"] is peftkit.LoraModel
    # the methods a mixed model really accepts: the reference's PeftMixedModel checks COMPATIBLE_TUNER_TYPES (with
    # OFT); its PEFT_TYPE_TO_MIXED_MODEL_MAPPING lists IA3 and RoAd, which that check then refuses, and lacks OFT
    from peft.tuners.mixed.model import COMPATIBLE_TUNER_TYPES

    assert {str(k) for k in mixed} <= {k.value for k in COMPATIBLE_TUNER_TYPES}
    with pytest.raises(KeyError):
        cfg["NOT_A_METHOD"]
    assert "LORA" in cfg and "NOPE" not in cfg


# ---------------------------------------------------------------------- optimizers
def _groups(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("build,cfg", [
    (tiny_llama, _llama_cfg()),
    (lambda: EmbModel(), {"target_modules": ["emb", "lin0"], "bias": "all"}),
])
def test_loraplus_param_groups_match_reference(build, cfg):
    ref, ours = _pair(build, **cfg)
    kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-5, "loraplus_weight_decay": 0.1}
    want = ref_opt.create_loraplus_optimizer(ref, torch.optim.AdamW, **dict(kwargs), eps=1e-7)
    got = pk_opt.create_loraplus_optimizer(ours, torch.optim.AdamW, **dict(kwargs), eps=1e-7)
    assert _groups(got, ours) == _groups(want, ref)
    assert got.defaults == want.defaults
    assert any(g["params"] for g in got.param_groups[1:3])  # embedding and B groups are not empty


def test_loraplus_rejects_non_class():
    _, ours = _pair(_mlp, target_modules=["lin0"])
    with pytest.raises(TypeError):
        pk_opt.create_loraplus_optimizer(ours, "adamw", lr=1e-3, loraplus_lr_ratio=2.0)


def test_lorafa_groups_and_steps_match_reference():
    ref, ours = _pair(_mlp, target_modules=["lin0", "lin1"], modules_to_save=None, r=4, lora_alpha=8)
    want = ref_opt.create_lorafa_optimizer(ref, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    got = pk_opt.create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    (wg,), (gg,) = want.param_groups, got.param_groups
    assert gg["names"] == wg["names"]
    assert gg["scaling_factors"] == wg["scaling_factors"]
    for key in ("lr", "weight_decay", "betas", "scaling_factor", "eps", "correct_bias"):
        assert gg[key] == wg[key], key
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()}
    x = torch.randn(8, 10)
    for _ in range(3):
        for model, opt in ((ref, want), (ours, got)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    # Adam steps are ~lr * sign(grad) early on; the reference projects B's gradient under bf16 autocast on CPU
    # (peftkit in float32), so allow a few bf16 ulps of the 1e-2 step
    want_state = peft.get_peft_model_state_dict(ref)
    got_state = peftkit.get_peft_model_state_dict(ours)
    assert set(got_state) == set(want_state)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], rtol=1e-3, atol=2e-4)


def test_lorafa_hyperparameter_errors():
    params = [nn.Parameter(torch.zeros(2))]
    for kwargs in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            ref_opt.lorafa.LoraFAOptimizer(params, **kwargs)
        with pytest.raises(ValueError):
            pk_opt.LoraFAOptimizer(params, **kwargs)
    opt = pk_opt.LoraFAOptimizer([{"params": params, "names": ["w"]}])
    with pytest.raises(KeyError):
        opt.step()
