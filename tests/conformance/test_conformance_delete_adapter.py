"""``delete_adapter`` leaves no trace of the deleted adapter in any layer (every method, every example config).

Generic over the layer classes: every dict attribute of a layer and every ``ModuleDict``/``ParameterDict`` child is
a per-adapter container when it is keyed by adapter names, so none may still hold the deleted name (before the fix
LoRA's ``lora_bias``/``use_rslora`` did).
"""

from __future__ import annotations

import pytest
import torch
from conformance_helpers import (
    ALL_CONFIGS,
    MethodConfig,
    adapter_modules,
    add_adapter,
    config_has_field,
    output,
    refused_field,
    supports,
    wrap,
)
from kind_models import KIND_CASES
from models import TASK_CASES, TaskCase
from torch import nn

#: one case per module kind: linear, embedding, conv, GPT-2 Conv1D, and the kinds of issue 18 (grouped conv,
#: MultiheadAttention, parameters)
CASES = [c for c in TASK_CASES if c.name in ("custom-mlp", "custom-emb", "custom-conv2d", "gpt2-causal")]
CASES += KIND_CASES
PARAMS = [pytest.param(mc, case, id=f"{mc.id}-{case.name}") for mc in ALL_CONFIGS for case in CASES
          if supports(mc.spec, case) and refused_field(mc, case) is None]


#: the dict attributes every ``nn.Module`` has (parameters, buffers, hooks, ...): not per-adapter containers
_MODULE_DICTS = frozenset(k for k, v in vars(nn.Module()).items() if isinstance(v, dict))


def _holders(module: nn.Module) -> dict[str, object]:
    """Every dict attribute and every ``ModuleDict``/``ParameterDict`` child of ``module`` (not its submodules')."""
    found: dict[str, object] = {k: v for k, v in vars(module).items() if isinstance(v, dict) and k not in _MODULE_DICTS}
    for name, child in module._modules.items():
        if isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
            found[name] = child
    return found


@pytest.mark.parametrize("mc, case", PARAMS)
def test_delete_adapter_leaves_no_entry_of_it(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.config(case))
    other = {"bias": "none"} if config_has_field(mc.spec, "bias") else {}  # one adapter may train biases
    add_adapter(model, "other", mc.observable(case, **other), seed=1)
    model.base_model.set_adapter(["default", "other"] if mc.spec.additive else "other")
    output(model, case)  # forward caches keyed by adapter
    with torch.no_grad():
        model.eval()
        output(model, case)
    model.delete_adapter("other")
    leftovers = [
        f"{name}.{attr}" for name, module in adapter_modules(model) for attr, holder in _holders(module).items()
        if "other" in holder  # type: ignore[operator]
    ]
    assert not leftovers, f"entries of the deleted adapter remain in {leftovers}"
    for name, module in adapter_modules(model):
        assert "other" not in module.active_adapters, name
