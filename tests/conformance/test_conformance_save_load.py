"""Conformance: ``save_pretrained`` -> ``PeftModel.from_pretrained`` is exact, and the directory holds exactly the
reference's files (safetensors, or ``.bin`` with ``safe_serialization=False``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from conformance_helpers import (
    ALL,
    FIRST,
    TOL_IDENTITY,
    MethodConfig,
    assert_close,
    base_model,
    output,
    perturb_trainable,
    wrap,
)
from models import TaskCase
from safetensors.torch import load_file

from peftkit import PeftModel, PeftWarning, get_peft_model_state_dict

SAFE_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
BIN_FILES = ["README.md", "adapter_config.json", "adapter_model.bin"]
#: the reference's warning on each adapter added to a grouped convolution (expected, unlike key warnings)
GROUPED_CONV_WARNING = "LoRA adapter added to .* merging is not supported"


def _trained(mc: MethodConfig, case: TaskCase) -> PeftModel:
    """A wrapped model whose trainable tensors (adapter, head copies, selected biases) all differ from a fresh one."""
    model = wrap(case, mc.observable(case))
    perturb_trainable(model)
    return model


def _assert_same_adapter(a: PeftModel, b: PeftModel) -> None:
    sd_a, sd_b = get_peft_model_state_dict(a), get_peft_model_state_dict(b)
    assert sd_a.keys() == sd_b.keys()
    unequal = [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
    assert not unequal, f"tensors differ after reload: {unequal[:5]}"


def _load(case: TaskCase, path: Path, **kwargs) -> PeftModel:
    """``from_pretrained`` on a fresh base; any PeftWarning (e.g. missing or unexpected keys) fails the test, except
    the reference's warning that a grouped convolution's adapter cannot be merged."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        warnings.filterwarnings("ignore", GROUPED_CONV_WARNING, PeftWarning)
        return PeftModel.from_pretrained(base_model(case), path, **kwargs)


@pytest.mark.parametrize("mc, case", ALL)
def test_save_load_round_trip_safetensors(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    model = _trained(mc, case)
    expected = output(model, case)
    state = get_peft_model_state_dict(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == SAFE_FILES
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert on_disk.keys() == state.keys()
    assert all(torch.equal(on_disk[k], state[k]) for k in state)
    assert not any(".default." in k for k in on_disk), "saved keys must not contain the adapter name"
    # tensors held once per model (MethodSpec.shared_state, VB-LoRA's bank) live on the tuner: base_model.<prefix>...
    shared = f"base_model.{mc.spec.prefix}" if mc.spec.shared_state is not None else "base_model.model."
    # or a model-level tensor directly under the tuner (VeRA's projections: base_model.vera_A, as the reference)
    assert all(k.startswith(("base_model.model.", shared)) or (k.startswith("base_model.") and k.count(".") == 1)
               for k in on_disk)

    loaded = _load(case, tmp_path)
    assert type(loaded) is type(model)
    _assert_same_adapter(model, loaded)
    assert_close(output(loaded, case), expected, TOL_IDENTITY, "reloaded vs saved")
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters()), "from_pretrained loads frozen by default"
    saved_cfg = {k: v for k, v in loaded.peft_config["default"].to_dict().items() if k != "inference_mode"}
    orig_cfg = {k: v for k, v in model.peft_config["default"].to_dict().items() if k != "inference_mode"}
    assert saved_cfg == orig_cfg


@pytest.mark.parametrize("mc, case", FIRST)
def test_save_load_round_trip_bin_trainable(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    """``safe_serialization=False`` writes ``adapter_model.bin``; ``is_trainable=True`` restores trainability."""
    model = _trained(mc, case)
    expected = output(model, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == BIN_FILES
    on_disk = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    state = get_peft_model_state_dict(model)
    assert on_disk.keys() == state.keys()

    loaded = _load(case, tmp_path, is_trainable=True)
    _assert_same_adapter(model, loaded)
    assert_close(output(loaded, case), expected, TOL_IDENTITY, "reloaded vs saved")
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("mc, case", FIRST)
def test_load_adapter_under_another_name(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    """A second adapter saved to ``<dir>/<name>/`` loads under any name, inactive and frozen, with the same
    tensors; activating it reproduces the saved model's outputs."""
    model = _trained(mc, case)
    expected = output(model, case)
    model.save_pretrained(tmp_path)

    other = wrap(case, mc.config(case), seed=1)
    other_out = output(other, case)
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        warnings.filterwarnings("ignore", GROUPED_CONV_WARNING, PeftWarning)
        result = other.load_adapter(tmp_path, adapter_name="loaded")
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert other.active_adapter == "default"
    assert {n for n, p in other.named_parameters() if p.requires_grad} == trainable
    assert_close(output(other, case), other_out, TOL_IDENTITY, "after load_adapter vs before")
    other.set_adapter("loaded")
    assert_close(output(other, case), expected, TOL_IDENTITY, "loaded adapter active vs saved model")

    other.save_pretrained(tmp_path / "both")
    assert sorted(os.listdir(tmp_path / "both" / "loaded")) == ["adapter_config.json", "adapter_model.safetensors"]
    sd_saved = load_file(tmp_path / "adapter_model.safetensors")
    sd_resaved = load_file(tmp_path / "both" / "loaded" / "adapter_model.safetensors")
    assert sd_saved.keys() == sd_resaved.keys()
    assert all(torch.equal(sd_saved[k], sd_resaved[k]) for k in sd_saved)
