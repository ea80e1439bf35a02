"""``convert_to_lora`` / ``save_as_lora`` (issue 18, item 4) against 🤗 PEFT 0.21.2's ``peft.tuners.lora.conversion``.

A LoHa or LoKr adapter (perturbed away from identity) becomes a LoRA through the SVD of each layer's ``ΔW``: at full
rank it reproduces the adapter's outputs, truncated it is the best rank-``k`` approximation, and with a float rank
each layer keeps the smallest rank holding that fraction of its singular value energy. Both libraries convert the
same adapter weights (saved by peftkit, loaded by the reference), and each library loads the other's output.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from models import MLP, Conv2dModel, tiny_gpt2
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import AdapterNotFoundError, ConfigError, UnsupportedModuleError
from peftkit.ops.svd import energy_rank, lowrank_reference

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class TwoLinear(nn.Module):
    """``x: (N, 8) -> (N, 8)`` through ``lin0: 8 -> 12``, tanh, ``lin1: 12 -> 8``; ``min(out, in) = 8`` for both."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 12)
        self.lin1 = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


#: full rank of every adapted layer of TwoLinear
FULL = 8
#: the longest reduction of one forward: lin0 (8) + lin1 (12), plus the SVD's reconstruction of ΔW, whose error is a
#: few ulp times min(out, in) = 8 per entry; 64 leaves room for both
REDUCTION = 64


def _tol() -> dict[str, float]:
    return fp_tol(torch.float32, REDUCTION)


def _base() -> nn.Module:
    torch.manual_seed(0)
    return TwoLinear()


def _inputs() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _config(lib: object, method: str, **extra: object) -> object:
    if method == "loha":
        return lib.LoHaConfig(target_modules=["lin0", "lin1"], r=2, alpha=4, init_weights=False, **extra)
    return lib.LoKrConfig(target_modules=["lin0", "lin1"], r=2, alpha=4, init_weights=False, **extra)


def _perturb(model: nn.Module, prefix: str) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _peftkit_model(method: str, **extra: object) -> nn.Module:
    model = peftkit.get_peft_model(_base(), _config(peftkit, method, **extra))
    _perturb(model, "hada_" if method == "loha" else "lokr_")
    return model.eval()


def _reference_copy(model: nn.Module, tmp_path: Path) -> nn.Module:
    """The reference's model holding the same adapter weights as the peftkit ``model`` (saved, then loaded)."""
    model.save_pretrained(tmp_path / "source")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_base(), tmp_path / "source").eval()


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs())


def _load(lib: object, path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(_base(), path).eval()


def _products(path: Path) -> dict[str, torch.Tensor]:
    """``B @ A`` per converted layer of a saved LoRA (the factors' signs are the SVD's choice; the product is not)."""
    tensors = load_file(path / WEIGHTS)
    return {key.removesuffix(".lora_A.weight"): tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            for key in tensors if key.endswith(".lora_A.weight")}


def _config_json(path: Path) -> dict[str, object]:
    data = json.loads((path / CONFIG).read_text())
    for key in ("peft_version", "revision"):
        data.pop(key, None)
    return {k: sorted(v) if isinstance(v, list) else v for k, v in data.items()}


METHODS = ["loha", "lokr"]


# ---------------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_conversion_reproduces_the_adapter_in_both_libraries(method: str, tmp_path: Path) -> None:
    model = _peftkit_model(method)
    expected = _out(model)
    assert not torch.allclose(expected, _out(_base().eval()), atol=1e-3)  # the adapter is not a no-op
    peftkit.save_as_lora(tmp_path / "lora", model, rank=FULL)
    config = json.loads((tmp_path / "lora" / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == FULL and config["lora_alpha"] == FULL
    assert set(load_file(tmp_path / "lora" / WEIGHTS)) == {
        f"base_model.model.{m}.lora_{ab}.weight" for m in ("lin0", "lin1") for ab in "AB"}
    for lib in (peftkit, peft):
        loaded = _load(lib, tmp_path / "lora")
        assert loaded.peft_config["default"].peft_type == "LORA"
        torch.testing.assert_close(_out(loaded), expected, **_tol())


@pytest.mark.parametrize("method", METHODS)
def test_truncated_rank_is_the_best_rank_k_approximation(method: str) -> None:
    model = _peftkit_model(method)
    config, tensors = peftkit.convert_to_lora(model, rank=3)
    assert config.r == 3 and config.lora_alpha == 3 and not config.rank_pattern
    for name in ("lin0", "lin1"):
        A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape == (3, getattr(model.base_model.model, name).in_features)
        delta = getattr(model.base_model.model, name).get_delta_weight("default").detach()
        # float32 SVD against a float64 one of the same matrix: a few ulp of ||ΔW|| per entry
        torch.testing.assert_close(B @ A, lowrank_reference(delta, 3).float(), **fp_tol(torch.float32, FULL * 4))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [FULL, 3, 1, 0.9, 0.5, 1.0], ids=["full", "r3", "r1", "t0.9", "t0.5", "t1.0"])
def test_same_lora_as_the_reference(method: str, rank: float, tmp_path: Path) -> None:
    """Same config file (r, lora_alpha, target_modules, rank/alpha patterns) and the same ``B @ A`` per layer as the
    reference's ``save_as_lora`` of the same adapter weights; each library loads both results identically."""
    model = _peftkit_model(method)
    ref_model = _reference_copy(model, tmp_path)
    peftkit.save_as_lora(tmp_path / "ours", model, rank=rank)
    peft.save_as_lora(tmp_path / "theirs", ref_model, rank=rank)
    assert _config_json(tmp_path / "ours") == _config_json(tmp_path / "theirs")
    ours, theirs = _products(tmp_path / "ours"), _products(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # ΔW computed by each library's own kernels, then the same SVD: rounding-level differences
        torch.testing.assert_close(ours[key], theirs[key], **fp_tol(torch.float32, FULL * 4))
    for lib in (peftkit, peft):  # each library reads the other's file and gets the same outputs as from its own
        torch.testing.assert_close(_out(_load(lib, tmp_path / "ours")), _out(_load(lib, tmp_path / "theirs")),
                                   **_tol())


def test_float_rank_picks_the_energy_cutoff_per_layer() -> None:
    model = _peftkit_model("loha")
    config, tensors = peftkit.convert_to_lora(model, rank=0.9)
    assert config.r == 1 and config.lora_alpha == 1
    for name in ("lin0", "lin1"):
        S = torch.linalg.svdvals(getattr(model.base_model.model, name).get_delta_weight("default").detach())
        k = config.rank_pattern[name]
        assert config.alpha_pattern[name] == k
        energy = (S**2).cumsum(0) / (S**2).sum()
        assert energy[k - 1] >= 0.9 - 1e-6 and (k == 1 or energy[k - 2] < 0.9)
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == k


def test_energy_rank_matches_the_reference_cutoff() -> None:
    from peft.tuners.lora.conversion import _find_cutoff_index

    S = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    for t in (0.01, 0.5, 0.76, 0.8, 0.95, 0.99, 1.0):
        assert energy_rank(S, t) == _find_cutoff_index(S, t), t
    assert energy_rank(torch.zeros(3), 0.5) == 1  # an all-zero ΔW (identity adapter) still gets rank 1


def test_reference_conversion_loads_in_peftkit(tmp_path: Path) -> None:
    """The reverse direction, for an adapter trained in the reference: its ``save_as_lora`` output loads in peftkit
    with the reference's outputs, and peftkit converts the same adapter to the same LoRA."""
    torch.manual_seed(3)
    ref_model = peft.get_peft_model(_base(), _config(peft, "lokr"))
    _perturb(ref_model, "lokr_")
    ref_model.eval()
    peft.save_as_lora(tmp_path / "theirs", ref_model, rank=FULL)
    torch.testing.assert_close(_out(_load(peftkit, tmp_path / "theirs")), _out(ref_model), **_tol())
    ref_model.save_pretrained(tmp_path / "lokr")
    ours = _load(peftkit, tmp_path / "lokr")
    torch.testing.assert_close(_out(ours), _out(ref_model), **_tol())
    peftkit.save_as_lora(tmp_path / "ours", ours, rank=FULL)
    for key, value in _products(tmp_path / "ours").items():
        torch.testing.assert_close(value, _products(tmp_path / "theirs")[key], **fp_tol(torch.float32, FULL * 4))


def test_modules_to_save_are_carried_over(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(_base(), peftkit.LoHaConfig(target_modules=["lin0"], r=2, alpha=4,
                                                                init_weights=False, modules_to_save=["lin1"]))
    _perturb(model, "hada_")
    _perturb(model, "modules_to_save")
    model.eval()
    ref_model = _reference_copy(model, tmp_path)
    config, _ = peftkit.convert_to_lora(model, rank=FULL)
    assert config.modules_to_save == ["lin1"]
    peftkit.save_as_lora(tmp_path / "ours", model, rank=FULL)
    peft.save_as_lora(tmp_path / "theirs", ref_model, rank=FULL)
    assert set(load_file(tmp_path / "ours" / WEIGHTS)) == set(load_file(tmp_path / "theirs" / WEIGHTS))
    assert _config_json(tmp_path / "ours") == _config_json(tmp_path / "theirs")
    for lib in (peftkit, peft):
        torch.testing.assert_close(_out(_load(lib, tmp_path / "ours")), _out(model), **_tol())


class NestedHead(nn.Module):
    """``x: (N, 8) -> (N, 8)``: ``lin0: 8 -> 12``, then ``head``, a ``Sequential`` of two linears (nested keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 12)
        self.head = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin0(x))


def test_nested_modules_to_save_keep_their_keys(tmp_path: Path) -> None:
    """A ``modules_to_save`` entry with sub-modules keeps its saved keys (``head.0.weight``); the reference names
    them by their last component only (``head.weight``, overwritten by each sub-module). The result loads in the
    reference with the adapter's outputs."""
    def base() -> nn.Module:
        torch.manual_seed(0)
        return NestedHead()

    model = peftkit.get_peft_model(base(), peftkit.LoKrConfig(target_modules=["lin0"], r=2, alpha=4,
                                                              init_weights=False, modules_to_save=["head"]))
    _perturb(model, "lokr_")
    _perturb(model, "modules_to_save")
    model.eval()
    _, tensors = peftkit.convert_to_lora(model, rank=FULL)
    assert {k for k in tensors if ".head." in k} == {
        f"base_model.model.head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    peftkit.save_as_lora(tmp_path / "ours", model, rank=FULL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(loaded), _out(model), **_tol())


def test_bfloat16_adapter_gives_bfloat16_factors() -> None:
    """As the reference: the SVD runs in float32 and the factors come back in ΔW's dtype."""
    model = _peftkit_model("loha").to(torch.bfloat16)
    _, tensors = peftkit.convert_to_lora(model, rank=2)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_gpt2_conv1d_lora_converts_like_the_reference(tmp_path: Path) -> None:
    """transformers' ``Conv1D`` stores ``(in, out)``: the factors must still be LoRA's ``(k, in)`` / ``(out, k)``.
    Converting LoRA to LoRA warns (as the reference) and, at the adapter's own rank, reproduces it."""
    model = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["c_attn"]))
    _perturb(model, "lora_")
    model.eval()
    ids = torch.arange(3, 10).unsqueeze(0)
    with pytest.warns(UserWarning, match="already a LoRA"):
        _, tensors = peftkit.convert_to_lora(model, rank=4)
    model.save_pretrained(tmp_path / "lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "lora").eval()
        _, ref_tensors = peft.convert_to_lora(ref, rank=4)
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in ref_tensors.items()}
    for key in tensors:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(tensors[b] @ tensors[key], ref_tensors[b] @ ref_tensors[key],
                                       **fp_tol(torch.float32, 32 * 4))
    with pytest.warns(UserWarning, match="already a LoRA"):
        peftkit.save_as_lora(tmp_path / "converted", model, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "converted").eval()
    with torch.no_grad():  # GPT-2's longest reduction: hidden 32 and FFN 128 over two layers, plus the LoRA rank
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, **fp_tol(torch.float32, 512))


def test_progressbar_and_compile_kwargs() -> None:
    model = _peftkit_model("loha")
    expected, _ = peftkit.convert_to_lora(model, rank=2)
    config, tensors = peftkit.convert_to_lora(model, rank=2, progressbar=True, compile_kwargs={"backend": "eager"})
    assert config.to_dict() == expected.to_dict() and len(tensors) == 4


def test_layers_answer_supports_lora_conversion_as_the_reference() -> None:
    """Per layer type, the same answer as the reference's ``supports_lora_conversion``."""
    cases = [
        (MLP, lambda lib: lib.LoHaConfig(target_modules=["lin0"])),
        (MLP, lambda lib: lib.LoKrConfig(target_modules=["lin0"])),
        (MLP, lambda lib: lib.LoraConfig(target_modules=["lin0"])),
        (MLP, lambda lib: lib.IA3Config(target_modules=["lin0"], feedforward_modules=[])),
        (Conv2dModel, lambda lib: lib.LoHaConfig(target_modules=["conv"])),
        (Conv2dModel, lambda lib: lib.LoKrConfig(target_modules=["conv"])),
        (Conv2dModel, lambda lib: lib.LoraConfig(target_modules=["conv"])),
    ]
    for build, make in cases:
        answers = []
        for lib in (peftkit, peft):
            torch.manual_seed(0)
            model = lib.get_peft_model(build(), make(lib))
            layers = [m for m in model.modules() if isinstance(m, lib.tuners.tuners_utils.BaseTunerLayer)] \
                if lib is peft else [m for m in model.modules() if isinstance(m, peftkit.AdapterLayer)]
            answers.append([m.supports_lora_conversion("default") for m in layers])
        assert answers[0] == answers[1], (build.__name__, make(peft))


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("rank", "error"), [(0, ValueError), (-2, ValueError), (1.5, ValueError), (0.0, ValueError),
                                             ("4", TypeError), (None, TypeError)])
def test_bad_rank_raises_typed_errors(rank: object, error: type[Exception]) -> None:
    model = _peftkit_model("loha")
    with pytest.raises(error) as info:
        peftkit.convert_to_lora(model, rank=rank)
    assert isinstance(info.value, ConfigError) and info.value.field == "rank" and repr(rank) in str(info.value)


def test_rank_above_the_layer_shape_names_the_layer(tmp_path: Path) -> None:
    model = _peftkit_model("lokr")
    with pytest.raises(ValueError, match="larger than the weight shape") as info:
        peftkit.convert_to_lora(model, rank=FULL + 1)
    assert isinstance(info.value, ConfigError) and "lin0" in str(info.value)
    with pytest.raises(ValueError, match="larger than the weight shape"):  # the reference raises ValueError too
        peft.convert_to_lora(_reference_copy(model, tmp_path), rank=FULL + 1)


@pytest.mark.parametrize("case", ["ia3", "conv_loha", "lora_embedding", "dora", "lora_bias", "no_adapter_layers"])
def test_unsupported_layers_raise_type_error_as_the_reference(case: str) -> None:
    def build(lib: object) -> nn.Module:
        torch.manual_seed(0)
        if case == "ia3":
            return lib.get_peft_model(MLP(), lib.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
        if case == "conv_loha":
            return lib.get_peft_model(Conv2dModel(), lib.LoHaConfig(target_modules=["conv", "lin0"]))
        if case == "lora_embedding":
            from models import EmbModel

            return lib.get_peft_model(EmbModel(), lib.LoraConfig(target_modules=["emb", "lin0"]))
        if case == "dora":
            return lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], use_dora=True))
        if case == "lora_bias":
            return lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], lora_bias=True))
        return MLP()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModuleError) as info:
            peftkit.convert_to_lora(build(peftkit), rank=2)
        assert isinstance(info.value, TypeError)
        if case not in ("dora", "lora_bias"):  # the reference converts these, dropping magnitude / bias (README)
            with pytest.raises(TypeError):
                peft.convert_to_lora(build(peft), rank=2)


def test_trained_bias_is_refused_as_the_reference() -> None:
    def build(lib: object) -> nn.Module:
        torch.manual_seed(0)
        return lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], bias="all"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="bias") as info:
            peftkit.convert_to_lora(build(peftkit), rank=2)
        assert isinstance(info.value, ValueError)
        with pytest.raises(ValueError, match="bias"):
            peft.convert_to_lora(build(peft), rank=2)


def test_unknown_adapter_name_raises_key_error() -> None:
    with pytest.raises(KeyError) as info:
        peftkit.convert_to_lora(_peftkit_model("loha"), rank=2, adapter_name="other")
    assert isinstance(info.value, AdapterNotFoundError) and "other" in str(info.value)


def test_converts_the_named_adapter_only(tmp_path: Path) -> None:
    """Two adapters on different layers: only the named one's layers are converted (the reference's conversion
    asks every tuner layer for the adapter and fails with an ``AttributeError`` on the others)."""
    model = _peftkit_model("loha")
    model.add_adapter("other", peftkit.LoHaConfig(target_modules=["lin1"], r=2, alpha=4, init_weights=False))
    _, tensors = peftkit.convert_to_lora(model, rank=2, adapter_name="other")
    assert sorted(tensors) == ["base_model.model.lin1.lora_A.weight", "base_model.model.lin1.lora_B.weight"]
    delta = model.base_model.model.lin1.get_delta_weight("other").detach()
    B, A = tensors["base_model.model.lin1.lora_B.weight"], tensors["base_model.model.lin1.lora_A.weight"]
    torch.testing.assert_close(B @ A, lowrank_reference(delta, 2).float(), **fp_tol(torch.float32, FULL * 4))


# ---------------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("name", ["convert_to_lora", "save_as_lora"])
def test_public_signature_matches_the_reference(name: str) -> None:
    ours, theirs = inspect.signature(getattr(peftkit, name)), inspect.signature(getattr(peft, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_pissa_weight_conversion_is_a_separate_internal_function() -> None:
    """``save_pretrained(path_initial_model_for_weight_conversion=...)`` keeps its own (renamed) converter; the
    public ``convert_to_lora`` is the reference's SVD conversion."""
    from peftkit.methods.lora import LORA
    from peftkit.methods.lora.convert import convert_initial_weights

    assert LORA.convert_for_save is convert_initial_weights
    assert peftkit.convert_to_lora is not convert_initial_weights
    assert "convert_to_lora" in peftkit.__all__ and "save_as_lora" in peftkit.__all__


def test_model_level_supports_lora_conversion_as_the_reference() -> None:
    """``PeftModel.supports_lora_conversion()`` (and the tuner's) answers as the reference's for convertible and
    non-convertible adapters, prompt learning included."""
    cases = [
        (_base, lambda lib: _config(lib, "loha")),
        (_base, lambda lib: _config(lib, "lokr")),
        (MLP, lambda lib: lib.IA3Config(target_modules=["lin0"], feedforward_modules=[])),
        (Conv2dModel, lambda lib: lib.LoKrConfig(target_modules=["conv", "lin0"])),
    ]
    for build, make in cases:
        answers = []
        for lib in (peftkit, peft):
            torch.manual_seed(0)
            model = lib.get_peft_model(build(), make(lib))
            answers.append((model.supports_lora_conversion(), model.base_model.supports_lora_conversion()))
        assert answers[0] == answers[1], make(peft)
    prompt = peftkit.get_peft_model(tiny_gpt2(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    assert prompt.supports_lora_conversion() is False
    with pytest.raises(TypeError, match="Could not detect any layer"):
        peftkit.convert_to_lora(prompt, rank=2)


def test_injected_adapter_converts_like_the_reference() -> None:
    """A model with an adapter injected by ``inject_adapter_in_model`` (no ``PeftModel``): keys without the
    ``base_model.model.`` prefix and the same config as the reference."""
    cfg = {"target_modules": ["lin0"], "r": 2, "alpha": 4, "init_weights": False}
    ours = peftkit.inject_adapter_in_model(peftkit.LoHaConfig(**cfg), _base())
    theirs = peft.inject_adapter_in_model(peft.LoHaConfig(**cfg), _base())
    config, tensors = peftkit.convert_to_lora(ours, rank=4)
    ref_config, ref_tensors = peft.convert_to_lora(theirs, rank=4)
    assert sorted(tensors) == sorted(ref_tensors) == ["lin0.lora_A.weight", "lin0.lora_B.weight"]
    mine, ref = config.to_dict(), ref_config.to_dict()
    assert {k: v for k, v in mine.items() if k != "peft_version"} == {
        k: v for k, v in ref.items() if k != "peft_version"}


def test_without_a_peft_config_the_scaling_stays_one() -> None:
    """Adapter layers on a model without ``peft_config``: ``lora_alpha = r`` (the reference keeps its default
    ``lora_alpha=8`` there, so its int-rank result is scaled by ``8 / r``; README: deliberate differences)."""
    model = peftkit.inject_adapter_in_model(
        peftkit.LoHaConfig(target_modules=["lin0", "lin1"], r=2, alpha=4, init_weights=False), _base()).eval()
    _perturb(model, "hada_")
    expected = _out(model)
    del model.peft_config
    config, tensors = peftkit.convert_to_lora(model, rank=FULL)
    assert config.r == config.lora_alpha == FULL and config.target_modules == {"lin0", "lin1"}
    lora = peftkit.inject_adapter_in_model(config, _base()).eval()
    peftkit.set_peft_model_state_dict(lora, tensors)
    torch.testing.assert_close(_out(lora), expected, **_tol())


def test_mixed_model_converts_a_nested_adapter(tmp_path: Path) -> None:
    """In a ``PeftMixedModel`` a LoHa layer wraps the LoRA layer of ``lin0``: converting the LoHa adapter alone
    gives a LoRA keyed by the adapted module's path (``lin0``, not ``lin0.base_layer``) that reproduces it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.get_peft_model(
            _base(), peftkit.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False), mixed=True)
        model.add_adapter("loha", _config(peftkit, "loha"))
    _perturb(model, "hada_")
    model.set_adapter("loha")
    model.eval()
    peftkit.save_as_lora(tmp_path / "lora", model, rank=FULL, adapter_name="loha")
    assert set(load_file(tmp_path / "lora" / WEIGHTS)) == {
        f"base_model.model.{m}.lora_{ab}.weight" for m in ("lin0", "lin1") for ab in "AB"}
    for lib in (peftkit, peft):
        torch.testing.assert_close(_out(_load(lib, tmp_path / "lora")), _out(model), **_tol())


def test_supports_lora_conversion_asks_the_layers_of_that_adapter_only() -> None:
    """``supports_lora_conversion(name)`` agrees with what ``convert_to_lora`` does: layers holding only other adapters
    (here a second adapter's LoKr layer on a Conv2d, which cannot convert) do not count."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(Conv2dModel(), peftkit.LoKrConfig(target_modules=["lin0"], init_weights=False))
    model.add_adapter("conv", peftkit.LoKrConfig(target_modules=["conv"]))
    assert model.supports_lora_conversion("default") and model.base_model.supports_lora_conversion("default")
    assert not model.supports_lora_conversion("conv")
    assert not model.supports_lora_conversion("missing")  # holds no layer: nothing to convert
    config, _ = peftkit.convert_to_lora(model, rank=2, adapter_name="default")
    assert config.r == 2
    with pytest.raises(UnsupportedModuleError):
        peftkit.convert_to_lora(model, rank=2, adapter_name="conv")
