"""QALoRA (``use_qalora``, ``qalora_group_size``; issue 20, item 2).

The reference (🤗 PEFT 0.21.2) applies QALoRA only to GPTQ-quantized linears (``lora.gptq.GPTQLoraLinear``, which
needs the ``gptqmodel`` package and its CUDA kernels): there ``lora_A`` becomes ``(r, in / group_size)`` and the
input is average-pooled over groups of ``group_size`` features, times ``in / group_size``. On every other layer
(``nn.Linear``, Conv1D, bitsandbytes, ...) the reference ignores ``use_qalora``: the layer gets plain LoRA.
peftkit adapts no GPTQ layers, so ``use_qalora=True`` gives plain LoRA on the layers it adapts -- exactly what
the reference gives them -- with a warning saying so. These tests check that parity (files both ways, same keys,
shapes, config fields and outputs), the validation of ``qalora_group_size``, and the pooled math the reference
uses, against a plain implementation, so that the formula documented in :mod:`peftkit.methods.lora.qalora` is the
reference's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models import MLP
from numerics import fp_tol
from safetensors.torch import load_file

import peftkit
from peftkit.errors import ConfigError, PeftWarning

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
#: longest reduction to an output: in_features 20 plus the rank, two layers
TOL = fp_tol(torch.float32, 32)


def _config(lib, **kw):
    kw.setdefault("qalora_group_size", 5)
    return lib.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_qalora=True, init_lora_weights=False, **kw)


def _model(lib, seed: int = 0):
    torch.manual_seed(seed)
    base = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftWarning)
        return lib.get_peft_model(base, _config(lib)).eval()


def _base(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def test_use_qalora_accepted_with_warning() -> None:
    with pytest.warns(PeftWarning, match="GPTQ"):
        cfg = _config(peftkit)
    assert cfg.use_qalora is True and cfg.qalora_group_size == 5


@pytest.mark.parametrize("value", [0, -2, 2.5, "16", True])
def test_bad_group_size_rejected(value: object) -> None:
    with pytest.raises(ConfigError, match="qalora_group_size"):
        peftkit.LoraConfig(target_modules=["lin0"], use_qalora=True, qalora_group_size=value)


def test_group_size_unchecked_without_qalora() -> None:
    """As the reference: ``qalora_group_size`` is only read when ``use_qalora=True``."""
    assert peftkit.LoraConfig(target_modules=["lin0"], qalora_group_size=0).qalora_group_size == 0


def test_same_keys_and_shapes_as_reference() -> None:
    ours = peftkit.get_peft_model_state_dict(_model(peftkit))
    ref = peft.get_peft_model_state_dict(_model(peft))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("save_lib,load_lib", [(peftkit, peft), (peft, peftkit)], ids=["ours->ref", "ref->ours"])
def test_interop(tmp_path: Path, save_lib, load_lib) -> None:
    model = _model(save_lib)
    with torch.no_grad():  # away from identity, in every adapter tensor
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(6, 10)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    saved_cfg = peft.LoraConfig.from_pretrained(tmp_path)
    assert saved_cfg.use_qalora is True and saved_cfg.qalora_group_size == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftWarning)
        loaded = load_lib.PeftModel.from_pretrained(_base(0), tmp_path).eval()
    assert loaded.peft_config["default"].use_qalora is True
    assert loaded.peft_config["default"].qalora_group_size == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **TOL)
    assert set(load_file(tmp_path / WEIGHTS)) == set(load_lib.get_peft_model_state_dict(loaded))


def test_plain_lora_math_identity_and_merge() -> None:
    """On a plain linear the adapter is ``base(x) + scaling * B A x`` (what the reference gives it), identity at
    init, and it merges."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftWarning)
        model = peftkit.get_peft_model(MLP(), peftkit.LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8,
                                                                  use_qalora=True)).eval()
    x = torch.randn(6, 10)
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(x)
        torch.testing.assert_close(model(x), base_out, **TOL)  # B = 0 at init
        layer = model.base_model.model.lin0
        layer.lora_B["default"].weight.normal_()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        h = layer.base_layer(x) + 2.0 * x @ A.T @ B.T
        expected = model.base_model.model.lin1(torch.relu(h))
        torch.testing.assert_close(model(x), expected, **TOL)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, **TOL)


def test_reference_qalora_pooling_matches_plain_formula() -> None:
    """The reference's GPTQ forward (``QALoraLinearVariant.forward``, run on a stand-in module since GPTQ layers
    cannot be built here) is ``result + scaling * (pool(x) * (in / g)) @ A.T @ B.T`` with ``pool`` the mean over
    consecutive groups of ``g`` features: the formula peftkit documents as the reference's."""
    from types import SimpleNamespace

    from peft.tuners.lora.variants import QALoraLinearVariant

    g, in_f, out_f, r = 4, 12, 5, 3
    torch.manual_seed(0)
    A, B = torch.nn.Linear(in_f // g, r, bias=False), torch.nn.Linear(r, out_f, bias=False)
    module = SimpleNamespace(lora_A={"a": A}, lora_B={"a": B}, lora_dropout={"a": torch.nn.Identity()},
                             scaling={"a": 0.5}, qalora_group_size={"a": g}, training=False, in_features=in_f)
    x = torch.randn(2, 3, in_f)
    result = torch.randn(2, 3, out_f)
    with torch.no_grad():
        got = QALoraLinearVariant.forward(module, active_adapter="a", x=x, result=result)
        pooled = torch.stack([x[..., i * g:(i + 1) * g].sum(-1) / g for i in range(in_f // g)], dim=-1)
        expected = result + 0.5 * (pooled * (in_f // g)) @ A.weight.T @ B.weight.T
    torch.testing.assert_close(got, expected, **fp_tol(torch.float32, in_f))
