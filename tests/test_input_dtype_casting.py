"""``cast_input_dtype_enabled`` (``disable_input_dtype_casting``) and hooks on ``lora_A`` / ``lora_B`` against the
reference 0.21.2: the reference calls ``lora_B(lora_A(dropout(x)))`` as modules, casting ``x`` to ``lora_A``'s
dtype only while casting is enabled; peftkit's fused paths (which read the weights directly) step aside to that
formula when casting is disabled or when those modules have hooks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from numerics import fp_tol
from torch import nn

import peftkit
from peftkit import helpers as pk_helpers
from tests.models import MLP

peft = pytest.importorskip("peft")
from peft import helpers as ref_helpers

torch.set_num_threads(1)


def _pair(base: nn.Module, **cfg: object) -> tuple[nn.Module, nn.Module]:
    """(reference, peftkit) PeftModels of two copies of ``base`` with the same (non-zero) adapter weights."""
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**cfg))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    return ref, ours


def _disable(model: nn.Module):
    helpers = pk_helpers if isinstance(model, peftkit.PeftModel) else ref_helpers
    return helpers.disable_input_dtype_casting(model)


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))


def test_conv_input_dtype_reaches_lora_A_uncast_when_disabled() -> None:
    """bf16 conv base, float32 adapters: lora_A sees float32 normally and the bf16 input inside the context (the
    hook casts it back so the conv can run), in both libraries."""
    for model in _pair(_conv(), target_modules=["0"]):
        model.eval()
        layer = model.base_model.model[0]
        layer.base_layer.to(torch.bfloat16)
        seen: list[torch.dtype] = []
        hook = layer.lora_A["default"].register_forward_pre_hook(
            lambda mod, args, seen=seen: (seen.append(args[0].dtype), (args[0].float(),))[1])
        x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
        with torch.no_grad():
            layer(x)
            with _disable(model):
                layer(x)
        hook.remove()
        assert seen == [torch.float32, torch.bfloat16], type(model)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_hooks_on_lora_A_and_lora_B_run_on_every_path(grad: bool) -> None:
    """Same-dtype Linear adapters (what the fused training node and the cached no-grad plan serve): hooks on
    ``lora_A`` / ``lora_B`` run once per forward as in the reference, also once the no-grad plan exists, and a
    hook that changes the input changes the output the same way in both libraries."""
    torch.manual_seed(0)
    ref, ours = _pair(MLP(), target_modules=["lin0"])
    x = torch.randn(3, 10)
    outs = []
    for model in (ref, ours):
        model.train(grad)
        layer = model.base_model.model.lin0
        with torch.set_grad_enabled(grad):
            for _ in range(2):  # without grad the second call builds / runs peftkit's cached plan
                layer(x)
            calls: list[str] = []
            hooks = [layer.lora_A["default"].register_forward_pre_hook(
                         lambda mod, args, calls=calls: (calls.append("A"), (args[0] * 2,))[1]),
                     layer.lora_B["default"].register_forward_hook(
                         lambda mod, args, out, calls=calls: calls.append("B"))]
            outs.append(layer(x).detach())
            for hook in hooks:
                hook.remove()
        assert calls == ["A", "B"], type(model)
    # lin0: in 10, r 8: float32 sums of ~18 terms
    torch.testing.assert_close(outs[1], outs[0], **fp_tol(torch.float32, 18))


def test_disabled_casting_without_hooks_fails_like_the_reference() -> None:
    """Casting disabled and nothing else managing dtypes: a bf16 input meets float32 ``lora_A`` weights, which
    torch refuses in both libraries (the same error class); with casting enabled both run."""
    torch.manual_seed(0)
    base = MLP()
    for model in _pair(base, target_modules=["lin0"]):
        model.eval()
        layer = model.base_model.model.lin0
        layer.base_layer.to(torch.bfloat16)
        x = torch.randn(2, 10, dtype=torch.bfloat16)
        with torch.no_grad():
            assert layer(x).dtype == torch.bfloat16
            with _disable(model), pytest.raises(RuntimeError):
                layer(x)
