"""Interop both ways between peftkit and the reference for one method on one model case, shared by the per-method
test files (``tests/test_<method>.py``).

A method's test file lists its scenarios (a model case of ``models.CASES_BY_NAME`` or ``kind_models``, and the
config keyword arguments) and calls :func:`check_interop_both_ways`: each library builds its adapter on a fresh
base, the adapter tensors are perturbed (so neither is identity or a copy of the other's initialisation), both save,
and then:

- the two ``adapter_model.safetensors`` have the same keys, shapes and dtypes, and ``get_peft_model_state_dict``
  the same keys in both libraries;
- the two ``adapter_config.json`` agree on ``peft_type``, ``task_type``, the target modules and the method's
  essential fields;
- peftkit loads the reference's directory with the reference's outputs, and the reference loads peftkit's with
  peftkit's (within :data:`INTEROP_TOL`), without warning about missing or unexpected keys;
- the adapter really changes the outputs (by more than ``min_change`` somewhere).

Each library's saved file also holds exactly the keys of its ``get_peft_model_state_dict``.

Also shared by those files: the model cases by name (:func:`case_model`, :func:`case_output`), the perturbation of
adapter tensors (:func:`perturb_adapter`), the mixed-batch row check (:func:`check_mixed_batch_rows`) and the
quantized linear bases (:func:`quantized_linear`, :class:`LinNet`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from models import CASES_BY_NAME, TaskCase, model_output
from safetensors.torch import load_file
from torch import nn

import peftkit

#: the issues' interop bound (outputs within 1e-5). The two libraries run the same formula through other kernels
#: and orders; on the tiny models (outputs of order one, reductions of at most a few hundred terms) the gap is a few
#: ulp, far below ``fp_tol(float32, TINY_MODEL_REDUCTION)`` (1.2e-4), so 1e-5 holds with a wide margin.
INTEROP_TOL: dict[str, float] = {"atol": 1e-5, "rtol": 1e-5}
#: saved fields compared for every method
COMMON_ESSENTIALS = ("peft_type", "task_type")
#: warnings a load must not give: the other library's file is complete and has no stray tensors
_KEY_WARNINGS = ("missing adapter keys", "unexpected keys", "Found missing adapter keys")


def interop_case(name: str) -> TaskCase:
    """A model case by name: ``models.TASK_CASES`` or the conformance suite's kind cases."""
    if name in CASES_BY_NAME:
        return CASES_BY_NAME[name]
    from kind_models import KIND_CASES

    return next(c for c in KIND_CASES if c.name == name)


def case_model(name: str) -> nn.Module:
    """A fresh (seeded, hence identical every call) base model of the named case, in eval mode."""
    return interop_case(name).build().eval()


def case_output(model: nn.Module, case: TaskCase, batch_size: int = 2,
                output: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The compared output of ``model`` on the case's (deterministic) inputs: ``output(model(**inputs))``, by default
    the case's ``output_key``."""
    with torch.no_grad():
        out = model(**case.make_inputs(batch_size))
    return (model_output(out, case.output_key) if output is None else output(out)).detach()


def perturb_adapter(model: nn.Module, markers: Iterable[str], seed: int, scale: float = 0.3) -> None:
    """Add ``scale * N(0, 1)`` noise to every floating parameter or buffer whose name contains one of ``markers``
    (the method's tensor prefixes, e.g. ``("hra_",)``)."""
    markers = tuple(markers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if any(m in name for m in markers) and tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * scale)


def _key_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(path / "adapter_model.safetensors").items()}


def _assert_no_key_warnings(caught: list[warnings.WarningMessage]) -> None:
    bad = [str(w.message) for w in caught if any(k in str(w.message) for k in _KEY_WARNINGS)]
    assert not bad, bad


def check_interop_both_ways(
    case: TaskCase | str,
    make_config: Callable[[Any], Any],
    tmp_path: Path,
    *,
    markers: Iterable[str] | None,
    essentials: Iterable[str] = (),
    tol: dict[str, float] | None = None,
    build: Callable[[], nn.Module] | None = None,
    check_changed: bool = True,
    min_change: float = 1e-4,
    perturb: Callable[[nn.Module, int], None] | None = None,
    saved: Mapping[str, Any] | None = None,
    output: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Run the checks of this module's docstring; returns (peftkit model, reference model), both saved and eval.

    ``make_config(lib)`` builds the config with ``lib`` = ``peftkit`` or ``peft`` (so both get the same fields).
    ``markers``: name fragments of the adapter tensors to perturb (None: leave the initialisation, for a method
    whose initialisation is already random). ``perturb(model, seed)``: the method's own perturbation, used instead
    of :func:`perturb_adapter` over ``markers`` (e.g. one scale per tensor kind). ``build``: the base model factory
    (default: the case's).
    ``tol``: output tolerance (default :data:`INTEROP_TOL`). ``min_change``: the largest output change the adapter
    must exceed (with ``check_changed``). ``saved``: fields both saved ``adapter_config.json`` must hold with
    exactly these values (e.g. the options the test set). ``output``: the compared tensor of a model call (default:
    the case's ``output_key``; see :func:`case_output`).
    """
    import peft

    case = interop_case(case) if isinstance(case, str) else case
    build = build or (lambda: case.build().eval())
    tol = tol or INTEROP_TOL

    def _out(model: nn.Module) -> torch.Tensor:
        return case_output(model, case, output=output)

    torch.manual_seed(0)
    ours = peftkit.get_peft_model(build(), make_config(peftkit)).eval()
    torch.manual_seed(1)
    ref = peft.get_peft_model(build(), make_config(peft)).eval()
    for model, seed in ((ours, 3), (ref, 4)):
        if perturb is not None:
            perturb(model, seed)
        elif markers is not None:
            perturb_adapter(model, markers, seed)
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))

    assert _key_shapes(tmp_path / "ours") == _key_shapes(tmp_path / "ref")
    assert set(peftkit.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
    assert set(peftkit.get_peft_model_state_dict(ours)) == set(_key_shapes(tmp_path / "ours"))
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    for key in (*COMMON_ESSENTIALS, *essentials):
        assert ca.get(key) == cb.get(key), (key, ca.get(key), cb.get(key))
    for key, value in (saved or {}).items():
        assert ca.get(key) == value and cb.get(key) == value, (key, value, ca.get(key), cb.get(key))
    assert sorted(ca["target_modules"] or []) == sorted(cb["target_modules"] or [])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peftkit.PeftModel.from_pretrained(build(), str(tmp_path / "ref")).eval()
    _assert_no_key_warnings(caught)
    torch.testing.assert_close(_out(loaded), _out(ref), **tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path / "ours")).eval()
    _assert_no_key_warnings(caught)
    torch.testing.assert_close(_out(ref_loaded), _out(ours), **tol)
    if check_changed:
        base = _out(build())
        assert (_out(ours) - base).abs().max() > min_change, "the peftkit adapter leaves the outputs"
        assert (_out(ref) - base).abs().max() > min_change, "the reference adapter leaves the outputs"
    return ours, ref


# ---------------------------------------------------------------------------------------------- mixed batches
def check_mixed_batch_rows(model: nn.Module, inputs: dict[str, torch.Tensor], names: list[str],
                           tol: dict[str, float], output: Callable[[Any], torch.Tensor] | None = None
                           ) -> torch.Tensor:
    """``model(**inputs, adapter_names=names)`` row by row against single-adapter runs of that row (``"__base__"``:
    inside ``disable_adapter()``), within ``tol`` (the same layers on a row subset: batched matmuls may block
    differently); returns the mixed output. ``output``: the compared tensor of a call (default ``out.logits``).
    Leaves the last named adapter active."""
    pick = output or (lambda out: out.logits)
    with torch.no_grad():
        mixed = pick(model(**inputs, adapter_names=names))
        for row, name in enumerate(names):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            if name == "__base__":
                with model.disable_adapter():
                    single = pick(model(**one))
            else:
                model.set_adapter(name)
                single = pick(model(**one))
            torch.testing.assert_close(mixed[row:row + 1], single, **tol)
    return mixed


# ---------------------------------------------------------------------------------------------- quantized bases
class LinNet(nn.Module):
    """One linear layer as ``lin`` (a quantized base to adapt): ``x: (..., in) -> (..., out)``."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def quantized_linear(variant: str, dense: nn.Linear) -> nn.Module:
    """``dense`` (with a bias) quantized on CPU: ``"8bit"`` (``Linear8bitLt``, threshold 0) or ``"nf4"``
    (``Linear4bit``, float32 compute) by bitsandbytes, ``"torchao-int8"`` (int8 weight-only) by torchao; the test
    is skipped where the library is missing. The bias stays float32 and frozen."""
    if variant == "torchao-int8":
        quant = pytest.importorskip("torchao.quantization")
        net = LinNet(nn.Linear(dense.in_features, dense.out_features))
        net.lin.load_state_dict(dense.state_dict())
        quant.quantize_(net, quant.Int8WeightOnlyConfig())
        return net.lin
    bnb = pytest.importorskip("bitsandbytes")
    if variant == "8bit":
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=True, has_fp16_weights=False,
                                    threshold=0.0)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         module=layer)
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")
