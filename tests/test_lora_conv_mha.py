"""LoRA on grouped convolutions (``groups > 1``) and on ``nn.MultiheadAttention`` (issue 18, item 2).

Semantics and file format follow the reference (🤗 PEFT 0.21.2 ``lora.layer._ConvNd`` / ``MultiheadAttention``):

- grouped conv: ``lora_A`` is a full conv ``in -> r`` with the base kernel, ``lora_B`` a 1x1 conv ``r -> out`` with
  the base's ``groups``; ``r`` must be divisible by ``groups``; merging is impossible (the update is dense across
  groups) and raises ``NotImplementedError``;
- MultiheadAttention: ``lora_A: (r, E)`` / ``lora_B: (3E, r)`` update ``in_proj_weight``, and the out projection is a
  LoRA ``Linear`` at ``<attn>.base_layer.out_proj``; both are saved.

Each library saves an adapter perturbed away from identity (``init_lora_weights=False`` plus noise), the other loads
it, and the outputs must agree.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import UnsupportedModuleError

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"


class GroupedConvNet(nn.Module):
    """Conv1d (groups=1), Conv1d (groups=2), depthwise Conv2d (groups=in=out=4) and Conv3d (groups=2) in sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv1d(4, 4, 1)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c3 = nn.Conv3d(4, 4, 1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, 4, L) -> (N, 4 * 6 * L)``."""
        h = self.c1(self.c0(x))  # (N, 6, L)
        h2 = self.c2(h[:, :4].unsqueeze(-1).expand(-1, -1, -1, 3))  # (N, 4, L, 3)
        h3 = self.c3(h2.unsqueeze(-1))  # (N, 4, L, 3, 1)
        return torch.cat([h.flatten(1), h2.flatten(1), h3.flatten(1)], dim=1)


class AttnNet(nn.Module):
    """Linear -> MultiheadAttention (E=8, 2 heads) -> Linear; ``x: (N, T, 8)`` either way round."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, T, 8) -> (N, T, 3)``."""
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.attn(h, h, h)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out)


#: longest reduction to an output: the conv / attention matmuls (in*kernel or E) plus the LoRA path (r), a few layers
REDUCTION = 64


def _tol() -> dict[str, float]:
    return fp_tol(torch.float32, REDUCTION)


def _base(kind: str, batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return GroupedConvNet() if kind == "conv" else AttnNet(batch_first)


def _inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 5, generator=g) if kind == "conv" else torch.randn(2, 5, 8, generator=g)


def _targets(kind: str) -> list[str]:
    return ["c0", "c1", "c2", "c3"] if kind == "conv" else ["attn"]


def _perturb(model: nn.Module) -> None:
    """Move every LoRA tensor away from its init (B starts random with init_lora_weights=False, but small)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _build(lib: object, kind: str, batch_first: bool = True) -> nn.Module:
    cfg = lib.LoraConfig(target_modules=_targets(kind), r=4, lora_alpha=8, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(_base(kind, batch_first), cfg)
    _perturb(model)
    return model.eval()


def _out(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs(kind))


CASES = [("conv", True), ("mha", True), ("mha", False)]
IDS = ["grouped_conv", "mha_batch_first", "mha_seq_first"]


@pytest.mark.parametrize(("kind", "batch_first"), CASES, ids=IDS)
def test_same_checkpoint_keys_and_shapes(kind: str, batch_first: bool) -> None:
    ours = peftkit.get_peft_model_state_dict(_build(peftkit, kind, batch_first))
    ref = peft.get_peft_model_state_dict(_build(peft, kind, batch_first))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize(("kind", "batch_first"), CASES, ids=IDS)
@pytest.mark.parametrize("saver", ["peftkit", "peft"])
def test_interop_both_ways(kind: str, batch_first: bool, saver: str, tmp_path: Path) -> None:
    save_lib, load_lib = (peftkit, peft) if saver == "peftkit" else (peft, peftkit)
    model = _build(save_lib, kind, batch_first)
    expected = _out(model, kind)
    assert not torch.allclose(expected, _out(_base(kind, batch_first).eval(), kind), atol=1e-3)  # not a no-op
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / WEIGHTS)) == {
        "base_model.model." + k.removeprefix("base_model.model.") for k in load_file(tmp_path / WEIGHTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_lib.PeftModel.from_pretrained(_base(kind, batch_first), tmp_path).eval()
    saved = save_lib.get_peft_model_state_dict(model)
    reloaded = load_lib.get_peft_model_state_dict(loaded)
    assert sorted(saved) == sorted(reloaded)
    for key, value in saved.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
    if kind == "conv":
        torch.testing.assert_close(_out(loaded, kind), expected, **_tol())
        return
    # MultiheadAttention: peftkit computes W + dW for out_proj; peft 0.21.2 adds the out_proj delta twice (a known
    # bug, huggingface/peft PR #3774) -- a deliberate difference (README), so each side is checked against the math
    ours, ref = (model, loaded) if saver == "peftkit" else (loaded, model)
    torch.testing.assert_close(_out(ours, kind), _manual_mha(ours, batch_first, out_factor=1), **_tol())
    torch.testing.assert_close(_out(ref, kind), _manual_mha(ours, batch_first, out_factor=2), **_tol())


def _manual_mha(model: nn.Module, batch_first: bool, out_factor: int) -> torch.Tensor:
    """The base model with ``in_proj_weight += dW_in`` and ``out_proj.weight += out_factor * dW_out`` (``model``: a
    peftkit LoRA model of :class:`AttnNet`), run on the test inputs."""
    attn = model.base_model.model.attn
    plain = _base("mha", batch_first).eval()
    with torch.no_grad():
        plain.attn.in_proj_weight += attn.get_delta_weight("default")
        plain.attn.out_proj.weight += out_factor * attn.out_proj_layer().get_delta_weight("default")
    return _out(plain, "mha")


def test_grouped_conv_rank_not_divisible_by_groups_is_refused() -> None:
    cfg = peftkit.LoraConfig(target_modules=["c1"], r=3)
    with pytest.raises(ValueError, match="groups") as info:
        peftkit.get_peft_model(_base("conv"), cfg)
    assert "3" in str(info.value)


def test_grouped_conv_merge_is_refused_and_changes_nothing() -> None:
    """The refusal comes before any layer is merged: the groups=1 conv ``c0`` (first in the model) stays unmerged."""
    model = _build(peftkit, "conv")
    expected = _out(model, "conv")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="groups"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="groups"):
        model.merge_and_unload()
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(_out(model, "conv"), expected, rtol=0, atol=0)


def test_grouped_conv_unload_gives_the_base_back() -> None:
    model = _build(peftkit, "conv")
    plain = model.unload()
    assert type(plain.c1) is nn.Conv1d and plain.c1.groups == 2
    torch.testing.assert_close(_out(plain, "conv"), _out(_base("conv").eval(), "conv"), rtol=0, atol=0)


def test_grouped_conv_trains() -> None:
    model = _build(peftkit, "conv").train()
    model(_inputs("conv")).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_merge_unmerge_and_merge_and_unload(batch_first: bool) -> None:
    model = _build(peftkit, "mha", batch_first)
    expected = _out(model, "mha")
    torch.testing.assert_close(expected, _manual_mha(model, batch_first, out_factor=1), **_tol())
    base_out = _out(_base("mha", batch_first).eval(), "mha")
    model.merge_adapter()
    torch.testing.assert_close(_out(model, "mha"), expected, **_tol())
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model, "mha"), expected, **_tol())
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, "mha"), base_out, **_tol())
    merged = model.merge_and_unload()
    assert type(merged.attn) is nn.MultiheadAttention
    assert type(merged.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(merged.attn.in_proj_weight, nn.Parameter)
    torch.testing.assert_close(_out(merged, "mha"), expected, **_tol())


def test_mha_unload_gives_the_base_back() -> None:
    model = _build(peftkit, "mha")
    plain = model.unload()
    assert type(plain.attn) is nn.MultiheadAttention
    assert type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert sorted(plain.state_dict()) == sorted(_base("mha").state_dict())
    torch.testing.assert_close(_out(plain, "mha"), _out(_base("mha").eval(), "mha"), rtol=0, atol=0)


def test_mha_trains_in_proj_and_out_proj_adapters() -> None:
    model = _build(peftkit, "mha").train()
    model(_inputs("mha")).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(
        f"base_model.model.attn.{pre}lora_{ab}.default.weight" for pre in ("", "base_layer.out_proj.") for ab in "AB")
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_mha_in_memory_names_match_the_reference() -> None:
    ours = sorted(n for n, _ in _build(peftkit, "mha").named_parameters())
    ref = sorted(n for n, _ in _build(peft, "mha").named_parameters())
    assert ours == ref


def test_mha_refuses_dora_and_separate_kv_dims() -> None:
    with pytest.raises(ValueError, match="use_dora"):
        peftkit.get_peft_model(_base("mha"), peftkit.LoraConfig(target_modules=["attn"], use_dora=True))

    class KV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    with pytest.raises(UnsupportedModuleError, match="kdim"):
        peftkit.get_peft_model(KV(), peftkit.LoraConfig(target_modules=["attn"]))


@pytest.mark.parametrize("config", [peftkit.LoHaConfig(target_modules=["attn"]),
                                    peftkit.IA3Config(target_modules=["attn"], feedforward_modules=[])])
def test_other_methods_refuse_mha(config: object) -> None:
    with pytest.raises(UnsupportedModuleError):
        peftkit.get_peft_model(_base("mha"), config)


def test_mha_second_adapter_switch_delete_and_lean_load(tmp_path: Path) -> None:
    """A second adapter lives on in_proj and out_proj alike; switching, deleting and a low_cpu_mem_usage load of
    its file (saved under its own name) give the outputs of the adapter that is active."""
    model = _build(peftkit, "mha")
    model.add_adapter("other", peftkit.LoraConfig(target_modules=["attn"], r=2, init_lora_weights=False))
    _perturb(model)
    first = _out(model, "mha")  # "default" stays active after add_adapter
    model.set_adapter("other")
    attn = model.base_model.model.attn
    assert attn.out_proj_layer().active_adapters == ["other"]
    second = _out(model, "mha")
    assert not torch.allclose(first, second, atol=1e-3)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    loaded = peftkit.PeftModel.from_pretrained(_base("mha"), tmp_path / "other", adapter_name="other",
                                               low_cpu_mem_usage=True).eval()
    torch.testing.assert_close(_out(loaded, "mha"), second, **_tol())
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not attn.out_proj_layer().has_adapter("other")
    torch.testing.assert_close(_out(model, "mha"), first, **_tol())


def test_mha_refuses_mixed_adapter_batches() -> None:
    model = _build(peftkit, "mha")
    with pytest.raises(TypeError, match="mixed"):
        model(_inputs("mha"), adapter_names=["default", "default"])


def test_failed_injection_restores_mha_out_proj(monkeypatch) -> None:
    """A failure on a later target undoes the MHA wrapper and the out_proj layer nested inside the base module."""
    import peftkit.injection.apply as apply_mod

    torch.manual_seed(0)
    model = AttnNet(batch_first=True)
    original_out_proj = model.attn.out_proj
    real = apply_mod.adapter_dtype

    def failing(base: nn.Module, autocast: bool) -> torch.dtype:
        if base is model.head:
            raise RuntimeError("injected failure")
        return real(base, autocast)

    monkeypatch.setattr(apply_mod, "adapter_dtype", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(target_modules=["attn", "head"]))
    assert type(model.attn) is nn.MultiheadAttention
    assert model.attn.out_proj is original_out_proj
    assert type(model.head) is nn.Linear


def test_failed_mha_layer_creation_restores_out_proj(monkeypatch) -> None:
    """A failure while the MHA layer itself is created (its out_proj adapter) leaves the base's out_proj as it was."""
    from peftkit.methods.lora.layers import Linear

    def failing(self: Linear, *args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure")

    torch.manual_seed(0)
    model = AttnNet(batch_first=True)
    original_out_proj = model.attn.out_proj
    monkeypatch.setattr(Linear, "update_layer", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(target_modules=["attn"]))
    assert type(model.attn) is nn.MultiheadAttention
    assert model.attn.out_proj is original_out_proj
