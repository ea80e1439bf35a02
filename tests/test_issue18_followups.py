"""Follow-ups of issue 18: the grouped-conv merge error's home, and conv ``lora_A`` dilation against the reference.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from numerics import fp_tol
from torch import nn

import peftkit
from peftkit import errors

peft = pytest.importorskip("peft")

torch.set_num_threads(1)


def test_grouped_conv_merge_error_is_a_typed_error_of_the_package() -> None:
    """``GroupedConvMergeError`` lives in ``peftkit.errors`` (exported at the top level): a ``MergeError`` and the
    ``NotImplementedError`` the reference raises; merging a grouped conv adapter raises it."""
    assert peftkit.GroupedConvMergeError is errors.GroupedConvMergeError
    assert issubclass(errors.GroupedConvMergeError, errors.MergeError)
    assert issubclass(errors.GroupedConvMergeError, NotImplementedError)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)),
                                   peftkit.LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(errors.GroupedConvMergeError, match="groups=2"):
        model.merge_adapter()


def _dilated(padding: int | str) -> nn.Module:
    """``x: (N, 3, 9, 9) -> (N, 4, 9, 9)``: a 3x3 conv with dilation 2 (size kept by ``padding``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=padding, dilation=2))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_x())


#: a conv output sums in_channels * kernel = 27 products, then the LoRA path (r = 4): float32
_TOL = fp_tol(torch.float32, 27 + 4)


def test_conv_lora_A_keeps_the_base_dilation_and_files_interoperate(tmp_path: Path) -> None:
    """peftkit's conv ``lora_A`` has the base's dilation (the reference builds it without: a reference bug, see
    README "Where peftkit differs"). Weight shapes do not depend on dilation, so each library loads the other's
    file; peftkit's unmerged output equals the merged one (merging folds ``B ∘ A`` into the dilated base kernel),
    and equals the reference's merged output, while the reference's unmerged output differs from both."""
    cfg = {"target_modules": ["0"], "r": 4, "lora_alpha": 8, "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_dilated("same"), peft.LoraConfig(**cfg))
    assert ref.base_model.model[0].lora_A["default"].dilation == (1, 1)  # the reference's choice
    ref.save_pretrained(tmp_path / "ref")
    ours = peftkit.PeftModel.from_pretrained(_dilated("same"), tmp_path / "ref")
    assert ours.base_model.model[0].lora_A["default"].dilation == (2, 2)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_dilated("same"), tmp_path / "ours")
    ref_sd, back_sd = peft.get_peft_model_state_dict(ref), peft.get_peft_model_state_dict(back)
    assert ref_sd.keys() == back_sd.keys() and all(torch.equal(ref_sd[k], back_sd[k]) for k in ref_sd)

    unmerged = _run(ours)
    torch.testing.assert_close(_run(copy.deepcopy(ours).merge_and_unload()), unmerged, **_TOL)
    ref_merged = _run(copy.deepcopy(ref).merge_and_unload())
    torch.testing.assert_close(ref_merged, unmerged, **_TOL)
    ref_unmerged = _run(ref)
    assert ref_unmerged.shape == unmerged.shape
    assert not torch.allclose(ref_unmerged, ref_merged, **_TOL)  # the reference disagrees with itself


def test_conv_lora_with_dilation_and_int_padding_runs_where_the_reference_cannot() -> None:
    """With an integer padding sized for the dilated kernel, the reference's undilated ``lora_A`` gives a larger
    output than the base (11x11 against 9x9) and its forward fails; peftkit's forward runs and equals its merge."""
    cfg = {"target_modules": ["0"], "r": 4, "lora_alpha": 8, "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_dilated(2), peft.LoraConfig(**cfg))
    with pytest.raises(RuntimeError):
        _run(ref)
    ours = peftkit.get_peft_model(_dilated(2), peftkit.LoraConfig(**cfg))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    unmerged = _run(ours)
    assert unmerged.shape == (2, 4, 9, 9)
    torch.testing.assert_close(_run(ours.merge_and_unload()), unmerged, **_TOL)
