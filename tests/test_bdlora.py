"""BD-LoRA (``use_bdlora``, block-diagonal LoRA factors; issue 20, item 2).

Semantics and file format are the reference's (🤗 PEFT 0.21.2 ``BdLoraConfig``, ``BdLoraLinearVariant``,
``BlockDiagonalLinear``): a targeted linear whose name contains a ``target_modules_bd_a`` pattern gets
``lora_A.weight: (r, in / nblocks)`` holding the ``nblocks`` diagonal blocks of A stacked by rows; one matching
``target_modules_bd_b`` gets ``lora_B.weight: (out, r / nblocks)`` likewise; the update is
``scaling * blockdiag(B) @ blockdiag(A)`` and merges. With ``match_strict=True`` every target must match a pattern.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models import MLP
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, PeftWarning

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
#: longest reduction to an output: in_features 20 plus the rank, two layers
TOL = fp_tol(torch.float32, 32)

#: lin0 (10 -> 20) has a block-diagonal B, lin1 (20 -> 2) a block-diagonal A; nblocks=2, r=4
BD = {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 2, "match_strict": True}
#: only lin0 is block-diagonal; lin1 is plain LoRA
BD_LOOSE = {"target_modules_bd_a": None, "target_modules_bd_b": ["lin0"], "nblocks": 2, "match_strict": False}


def _config(lib, bd: dict, **kw):
    return lib.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, use_bdlora=dict(bd), **kw)


def _base(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def _model(lib, bd: dict = BD, seed: int = 0, **kw):
    return lib.get_peft_model(_base(seed), _config(lib, bd, **kw)).eval()


def _perturb(model: nn.Module) -> None:
    """Move every adapter tensor away from its init (B = 0 at init would hide A)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)


def _blockdiag(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Plain: the ``(out, in)`` matrix whose diagonal blocks are the ``nblocks`` row-chunks of ``w: (out, in / n)``."""
    out, k = w.shape
    n = out // nblocks
    full = torch.zeros(out, k * nblocks)
    for i in range(nblocks):
        full[i * n:(i + 1) * n, i * k:(i + 1) * k] = w[i * n:(i + 1) * n]
    return full


def test_same_keys_and_shapes_as_reference() -> None:
    ours = peftkit.get_peft_model_state_dict(_model(peftkit))
    ref = peft.get_peft_model_state_dict(_model(peft))
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}
    assert shapes["base_model.model.lin0.lora_B.weight"] == (20, 2)
    assert shapes["base_model.model.lin1.lora_A.weight"] == (4, 10)


@pytest.mark.parametrize("bd", [BD, BD_LOOSE], ids=["strict", "loose"])
def test_math_against_plain_blockdiag(bd: dict) -> None:
    model = _model(peftkit, bd)
    _perturb(model)
    m = model.base_model.model
    x = torch.randn(6, 10)

    def delta(layer: nn.Module, name: str) -> torch.Tensor:
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        A = _blockdiag(A, 2) if name in (bd["target_modules_bd_a"] or []) else A
        B = _blockdiag(B, 2) if name in (bd["target_modules_bd_b"] or []) else B
        return 2.0 * B @ A  # scaling = lora_alpha / r

    with torch.no_grad():
        h = torch.relu(x @ (m.lin0.base_layer.weight + delta(m.lin0, "lin0")).T + m.lin0.base_layer.bias)
        expected = h @ (m.lin1.base_layer.weight + delta(m.lin1, "lin1")).T + m.lin1.base_layer.bias
        torch.testing.assert_close(model(x), expected, **TOL)
        torch.testing.assert_close(model(x.unsqueeze(0)).squeeze(0), expected, **TOL)  # 3-D input


def test_identity_at_init() -> None:
    model = _model(peftkit)
    x = torch.randn(6, 10)
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(x)
        torch.testing.assert_close(model(x), base_out, **TOL)
    m = model.base_model.model
    assert torch.count_nonzero(m.lin0.lora_B["default"].weight) == 0  # block-diagonal B: zeros
    assert torch.count_nonzero(m.lin1.lora_A["default"].weight) > 0  # block-diagonal A: random


def test_training_step_updates_only_blocks() -> None:
    model = _model(peftkit).train()
    out = model(torch.randn(6, 10)).pow(2).sum()
    out.backward()
    m = model.base_model.model
    assert m.lin0.lora_B["default"].weight.grad is not None
    assert m.lin1.lora_A["default"].weight.grad is not None
    assert m.lin0.base_layer.weight.grad is None


@pytest.mark.parametrize("save_lib,load_lib", [(peftkit, peft), (peft, peftkit), (peftkit, peftkit)],
                         ids=["ours->ref", "ref->ours", "ours->ours"])
@pytest.mark.parametrize("bd", [BD, BD_LOOSE], ids=["strict", "loose"])
def test_interop(tmp_path: Path, save_lib, load_lib, bd: dict) -> None:
    model = _model(save_lib, bd)
    _perturb(model)
    x = torch.randn(6, 10)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    saved_cfg = peft.LoraConfig.from_pretrained(tmp_path)
    assert saved_cfg.use_bdlora == peft.BdLoraConfig(**bd)
    loaded = load_lib.PeftModel.from_pretrained(_base(0), tmp_path).eval()
    cfg = loaded.peft_config["default"].use_bdlora
    assert {k: getattr(cfg, k) for k in bd} == bd
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **TOL)
    saved = load_file(tmp_path / WEIGHTS)
    reloaded = load_lib.get_peft_model_state_dict(loaded)
    assert set(saved) == set(reloaded)
    for key, tensor in saved.items():
        torch.testing.assert_close(reloaded[key], tensor, rtol=0, atol=0)  # exact: a file round trip keeps the bits


def test_merge_unmerge_and_unload() -> None:
    model = _model(peftkit)
    _perturb(model)
    x = torch.randn(6, 10)
    m = model.base_model.model
    w0 = m.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, **TOL)
        model.unmerge_adapter()
        torch.testing.assert_close(m.lin0.base_layer.weight, w0, **TOL)
        torch.testing.assert_close(model(x), expected, **TOL)
        merged = model.merge_and_unload(safe_merge=True)
        torch.testing.assert_close(merged(x), expected, **TOL)


def test_merge_matches_reference() -> None:
    ours, ref = _model(peftkit), _model(peft)
    _perturb(ref)
    ref_sd = peft.get_peft_model_state_dict(ref)
    peftkit.set_peft_model_state_dict(ours, ref_sd)
    x = torch.randn(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours.merge_and_unload()(x), ref.merge_and_unload()(x), **TOL)


def test_bdlora_config_object() -> None:
    from peftkit.methods.lora.bdlora import BdLoraConfig

    cfg = peftkit.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_bdlora=BdLoraConfig(**BD))
    assert cfg.use_bdlora == BdLoraConfig(**BD)
    assert peftkit.LoraConfig(target_modules=["lin0"], use_bdlora=BD).use_bdlora == BdLoraConfig(**BD)


@pytest.mark.parametrize("bd,field", [
    ({"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin0"]}, "use_bdlora"),
    ({"target_modules_bd_a": ["lin1"], "nblocks": 0}, "nblocks"),
    ({"target_modules_bd_a": ["lin1"], "nblocks": 2.0}, "nblocks"),
    ({"target_modules_bd_a": "lin1"}, "target_modules_bd_a"),
    ({"target_modules_bd_b": ["lin1"], "match_strict": "yes"}, "match_strict"),
])
def test_bad_bdlora_config(bd: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        peftkit.LoraConfig(target_modules=["lin0"], use_bdlora=bd)


def test_bad_bdlora_type() -> None:
    with pytest.raises(TypeError, match="use_bdlora"):
        peftkit.LoraConfig(target_modules=["lin0"], use_bdlora=True)


def test_strict_unmatched_target_rejected() -> None:
    bd = {"target_modules_bd_a": ["lin1"], "nblocks": 2}
    with pytest.raises(ValueError):  # the reference: ValueError
        _model(peft, bd)
    with pytest.raises(ConfigError, match="lin0"):
        _model(peftkit, bd)


def test_indivisible_blocks_rejected() -> None:
    bd = {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 3}
    with pytest.raises(ValueError):
        _model(peft, bd)
    with pytest.raises(ConfigError, match="nblocks"):
        _model(peftkit, bd)


def test_unsupported_combinations_rejected() -> None:
    with pytest.raises(ConfigError):  # DoRA + BD-LoRA: the reference has no such combination either
        _model(peftkit, BD, use_dora=True)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        _model(peftkit, BD, init_lora_weights="pissa")


def test_non_linear_target_rejected() -> None:
    from models import EmbModel

    cfg = {"target_modules_bd_a": ["emb"], "nblocks": 1}
    with pytest.raises(ValueError):
        peft.get_peft_model(EmbModel(), peft.LoraConfig(target_modules=["emb"], use_bdlora=dict(cfg)))
    with pytest.raises(ConfigError, match="use_bdlora"):
        peftkit.get_peft_model(EmbModel(), peftkit.LoraConfig(target_modules=["emb"], use_bdlora=dict(cfg)))


def test_no_warning_for_plain_use() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        _model(peftkit)


def test_hf_conv1d_target_rejected() -> None:
    """The reference's BD-LoRA reads ``in_features`` / ``out_features`` of the base, which transformers' Conv1D
    lacks (AttributeError there); peftkit refuses such a target with a typed error instead."""
    from models import tiny_gpt2

    bd = {"target_modules_bd_b": ["c_attn"], "nblocks": 2}
    with pytest.raises(AttributeError):
        peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn"], r=4, use_bdlora=dict(bd)))
    with pytest.raises(ConfigError, match="c_attn"):
        peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(target_modules=["c_attn"], r=4, use_bdlora=dict(bd)))


def test_add_weighted_adapter_refused() -> None:
    model = _model(peftkit)
    with pytest.raises(ConfigError, match="use_bdlora"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="svd")
    assert "combined" not in model.peft_config


def test_mixed_batch_refused_and_plain_adapter_beside() -> None:
    """A plain LoRA adapter beside a BD-LoRA one on the same layers keeps working; mixed batches with a BD-LoRA
    adapter are refused (peftkit refuses every variant there)."""
    model = _model(peftkit)
    model.add_adapter("plain", peftkit.LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False))
    x = torch.randn(3, 10)
    with torch.no_grad():
        model.set_adapter("plain")
        plain = model(x)
        model.set_adapter("default")
        bd = model(x)
        assert not torch.allclose(plain, bd)
        with pytest.raises(ValueError, match="BD-LoRA"):
            model(x, adapter_names=["plain", "default", "__base__"])


def test_load_with_low_cpu_mem_usage(tmp_path: Path) -> None:
    model = _model(peft)
    _perturb(model)
    x = torch.randn(6, 10)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(_base(0), tmp_path, low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **TOL)


@pytest.mark.parametrize("save_lib,load_lib", [(peftkit, peft), (peft, peftkit)], ids=["ours->ref", "ref->ours"])
def test_interop_llama(tmp_path: Path, save_lib, load_lib) -> None:
    """All seven Llama projections (block-diagonal A for q/k/v/up/gate, B for o/down, as the reference's field
    help suggests) on a tiny Llama: logits agree both ways, and after merging."""
    from models import causal_lm_inputs, tiny_llama

    bd = {"target_modules_bd_a": ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"],
          "target_modules_bd_b": ["o_proj", "down_proj"], "nblocks": 2}
    cfg = save_lib.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_bdlora=bd,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj",
                                              "down_proj"])
    model = save_lib.get_peft_model(tiny_llama(), cfg).eval()
    _perturb(model)
    inputs = causal_lm_inputs(2)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = load_lib.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    tol = fp_tol(torch.float32, 256)  # several layers of hidden/FFN-sized reductions
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, **tol)
        torch.testing.assert_close(loaded.merge_and_unload()(**inputs).logits, expected, **tol)
