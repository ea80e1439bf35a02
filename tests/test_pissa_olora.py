"""PiSSA (``init_lora_weights="pissa"`` / ``"pissa_niter_<k>"``) and OLoRA (``"olora"``) on Llama, GPT-2 and T5:
the base weight becomes the residual ``W - s * B @ A`` so outputs are unchanged at init; A and B follow the SVD / QR
definitions; ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes a plain rank-``2r`` LoRA that
applies to the ORIGINAL base model, matching the reference's conversion; and the residual-base recipe (no
conversion) round-trips between the libraries."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import CASES_BY_NAME, model_output
from numerics import fp_tol
from safetensors.torch import load_file

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.lora.layers import Linear

INITS = ["pissa", "pissa_niter_4", "olora"]


def _out(model, case):
    with torch.no_grad():
        return model_output(model(**case.make_inputs(2)), case.output_key)


def _config(case, init, lib=peftkit, **kw):
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": init, "target_modules": list(case.target_modules),
              "task_type": case.task_type, **kw}
    return lib.LoraConfig(**kwargs)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("case_name", ["llama-causal", "gpt2-causal", "t5-seq2seq"])
def test_output_unchanged_at_init_and_base_modified(case_name, init):
    case = CASES_BY_NAME[case_name]
    base = case.build().eval()
    ref = _out(base, case)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules()
                 if n.split(".")[-1] in case.target_modules and hasattr(m, "weight")}
    torch.manual_seed(0)
    model = peftkit.get_peft_model(base, _config(case, init)).eval()
    torch.testing.assert_close(_out(model, case), ref, atol=1e-5, rtol=0)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    assert layers
    for name, layer in layers:
        key = name.removeprefix("base_model.model.")
        W = originals[key]
        W_out_in = W.t() if layer.fan_in_fan_out else W
        s = layer.scaling["default"]
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert not torch.allclose(layer.get_base_layer().weight, W)  # the base holds the residual
        torch.testing.assert_close(layer._weight_out_in() + s * B @ A, W_out_in, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case_name", ["llama-causal", "gpt2-causal", "t5-seq2seq"])
def test_pissa_and_olora_follow_svd_and_qr(case_name):
    case = CASES_BY_NAME[case_name]
    for init in ("pissa", "olora"):
        base = case.build()
        name, module = next((n, m) for n, m in base.named_modules() if n.split(".")[-1] in case.target_modules)
        W = module.weight.detach().clone()
        model = peftkit.get_peft_model(base, _config(case, init))
        layer = model.get_submodule(f"base_model.model.{name}")
        W = W.t() if layer.fan_in_fan_out else W
        r, s = 4, layer.scaling["default"]
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            torch.testing.assert_close(s * B @ A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-5, rtol=0)
            torch.testing.assert_close(A, torch.diag(torch.sqrt(S[:r] / s)) @ Vh[:r], atol=1e-5, rtol=0)
            torch.testing.assert_close(B, U[:, :r] @ torch.diag(torch.sqrt(S[:r] / s)), atol=1e-5, rtol=0)
        else:
            Q, R = torch.linalg.qr(W)
            torch.testing.assert_close(B, Q[:, :r], atol=1e-6, rtol=0)
            torch.testing.assert_close(A, R[:r], atol=1e-6, rtol=0)
            torch.testing.assert_close(B.t() @ B, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer._weight_out_in(), W - s * B @ A, atol=1e-6, rtol=0)


def test_rejected_on_embedding_targets():
    case = CASES_BY_NAME["llama-causal"]
    cfg = peftkit.LoraConfig(r=4, init_lora_weights="olora", target_modules=["embed_tokens"],
                             task_type=case.task_type)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        peftkit.get_peft_model(case.build(), cfg)


def _train(model, case, steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = model_output(model(**case.make_inputs(2)), case.output_key)
        (out.float().pow(2).mean()).backward()
        opt.step()
    model.eval()


@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("case_name", ["llama-causal", "t5-seq2seq"])
def test_conversion_reproduces_training_on_original_base_and_matches_reference(case_name, init, tmp_path):
    peft = pytest.importorskip("peft")
    case = CASES_BY_NAME[case_name]
    model = peftkit.get_peft_model(case.build(), _config(case, init))
    model.save_pretrained(tmp_path / "initial")
    # the reference initialises the same way from the same base: same A, B and residual
    ref = peft.get_peft_model(case.build(), _config(case, init, lib=peft))
    ref.save_pretrained(tmp_path / "ref_initial")
    ours_init = load_file(tmp_path / "initial" / "adapter_model.safetensors")
    ref_init = load_file(tmp_path / "ref_initial" / "adapter_model.safetensors")
    assert ours_init.keys() == ref_init.keys()
    for key in ours_init:
        torch.testing.assert_close(ours_init[key], ref_init[key], atol=1e-5, rtol=0)

    _train(model, case)
    trained = _out(model, case)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    converted = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert (trained - _out(case.build().eval(), case)).abs().max() > 1e-4  # training moved the outputs
    for lib in (peftkit, peft):  # the plain LoRA applies to the ORIGINAL base, in both libraries
        loaded = lib.PeftModel.from_pretrained(case.build(), tmp_path / "converted").eval()
        torch.testing.assert_close(_out(loaded, case), trained, atol=1e-5, rtol=0)

    # the reference's conversion of the same trained tensors gives the same file
    ours_trained = peftkit.get_peft_model_state_dict(model)
    peft.set_peft_model_state_dict(ref, ours_trained)
    ref.save_pretrained(tmp_path / "ref_converted",
                        path_initial_model_for_weight_conversion=str(tmp_path / "ref_initial"))
    ref_converted = load_file(tmp_path / "ref_converted" / "adapter_model.safetensors")
    assert converted.keys() == ref_converted.keys()
    for key in converted:
        # peftkit's conversion vs the reference's: element-wise (concatenate, negate, scale), no reduction
        torch.testing.assert_close(converted[key], ref_converted[key], **fp_tol(torch.float32, 1))
    ref_cfg = json.loads((tmp_path / "ref_converted" / "adapter_config.json").read_text())
    assert (ref_cfg["r"], ref_cfg["lora_alpha"]) == (cfg["r"], cfg["lora_alpha"])
    # and the reference's converted file, loaded by peftkit on the original base, reproduces the training
    loaded = peftkit.PeftModel.from_pretrained(case.build(), tmp_path / "ref_converted").eval()
    torch.testing.assert_close(_out(loaded, case), trained, atol=1e-5, rtol=0)


def test_conversion_rejects_rslora_with_patterns_and_keeps_scaling(tmp_path):
    case = CASES_BY_NAME["llama-causal"]
    model = peftkit.get_peft_model(case.build(), _config(case, "pissa", use_rslora=True))
    model.save_pretrained(tmp_path / "initial")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    # rsLoRA scaling alpha / sqrt(r) is kept at rank 2r with alpha * sqrt(2)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    loaded = peftkit.PeftModel.from_pretrained(case.build(), tmp_path / "converted").eval()
    torch.testing.assert_close(_out(loaded, case), _out(model.eval(), case), atol=1e-4, rtol=0)
    patterned = peftkit.get_peft_model(case.build(), _config(case, "pissa", use_rslora=True,
                                                             rank_pattern={"q_proj": 2}))
    with pytest.raises(ConfigError, match="use_rslora"):
        patterned.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "initial")


@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("case_name", ["llama-causal", "t5-seq2seq"])
def test_residual_workflow_trains_only_the_adapter_and_round_trips_both_ways(case_name, init, tmp_path):
    """The reference's PiSSA recipe without conversion: set ``init_lora_weights=True`` in the model's config before
    saving (so loading does not re-initialise from the base), save the residual base (``unload()``), and load the
    adapter on it. Training changes only the adapter (the residual stays as initialised); the adapter saved by
    either library loads in the other on the residual base with the same outputs and the same keys and shapes;
    merging keeps the outputs."""
    peft = pytest.importorskip("peft")
    case = CASES_BY_NAME[case_name]
    results = {}
    for lib in (peftkit, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(case.build(), _config(case, init, lib=lib))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        _train(model, case)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
        out = _out(model, case)
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(tmp_path / lib.__name__)
        residual = {k: v.clone() for k, v in copy.deepcopy(model).unload().state_dict().items()}
        results[lib.__name__] = (out, residual)
        merged = model.merge_and_unload()
        torch.testing.assert_close(_out(merged, case), out, atol=1e-5, rtol=0)
    keys = [{k: v.shape for k, v in load_file(tmp_path / n / "adapter_model.safetensors").items()} for n in results]
    assert keys[0] == keys[1]
    for saver, (out, residual) in results.items():
        for lib in (peftkit, peft):
            base = case.build()
            base.load_state_dict(residual)
            loaded = lib.PeftModel.from_pretrained(base, tmp_path / saver).eval()
            torch.testing.assert_close(_out(loaded, case), out, atol=1e-5, rtol=0)
