"""MonteCLoRA (``LoraConfig.monteclora_config``, issue 20 item 2) against a plain implementation and the reference.

The reference (🤗 PEFT 0.21.2 ``MontecloraLinearVariant`` / ``MontecloraSampler``) is plain LoRA in eval mode and
averages ``num_samples`` noisy copies of ``lora_A`` in training mode. Eval outputs are compared directly; training
outputs are compared for one shared noise sample (both libraries are handed the same ``z_mvn`` / ``z_wishart`` /
``z_dirichlet``), since each library draws its own. Also: Megatron tensor-parallel LoRA is rejected by name.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from numerics import fp_tol
from torch import nn

import peftkit
from peftkit.errors import ConfigError, ConfigTypeError
from peftkit.methods.lora.monteclora import MontecloraConfig, MontecloraSampler

peft = pytest.importorskip("peft")

IN, HID, OUT, R, N = 6, 5, 3, 2, 3
#: fp32 sums of at most 6 + 2 + 5 + 2 terms over the two layers (plus N=3 samples): 16 terms, ~7.6e-6 (< 1e-5)
TOL = fp_tol(torch.float32, 16)


class Net(nn.Module):
    """``x: (B, 6) -> (B, 3)`` through two linears (both adapted)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(IN, HID)
        self.b = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _mc(**kw: object) -> dict[str, object]:
    return {"num_samples": N, "buffer_size": 2, "sample_scaler": 0.3, **kw}


def _config(lib: object, **kw: object) -> object:
    mc = kw.pop("monteclora_config", _mc())
    return lib.LoraConfig(r=R, lora_alpha=4, target_modules=["a", "b"], monteclora_config=mc, **kw)


def _perturbed(model: nn.Module) -> nn.Module:
    """Move every adapter tensor (lora_B included) away from its init, deterministically."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _x() -> torch.Tensor:
    return torch.randn(4, IN, generator=torch.Generator().manual_seed(3))


def _sample(seed: int, in_features: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, R + 2, generator=g)
    return {"z_mvn": torch.randn(N, in_features, R, generator=g), "z_wishart": z @ z.T,
            "z_dirichlet": torch.randn(N, generator=g)}


# ---------------------------------------------------------------------------- plain implementation
def plain_sampled_A(A: torch.Tensor, std_prior: torch.Tensor, ew_prior: torch.Tensor, scaler: float,
                    sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's/reference's sampled ``A' : (r, in)`` for ``A: (r, in)``, plus ``Σ: (r, r)`` and ``w: (N,)``,
    written directly (per-sample loop, explicit Laplace-Dirichlet)."""
    s = torch.exp(std_prior)
    cov = torch.diag(torch.clamp(s * torch.diagonal(sample["z_wishart"]) * s, min=1e-3))  # diag(s) Z diag(s), diag
    L = torch.diag(torch.sqrt(torch.diagonal(cov)))  # Cholesky of a diagonal matrix
    alpha = torch.exp(ew_prior)
    n = alpha.numel()
    mu = torch.log(alpha) - torch.log(alpha).mean()
    var = 1 / alpha * (1 - 2 / n) + (1 / alpha).sum() / n**2 + 1e-6
    w = torch.softmax(torch.sqrt(var) * sample["z_dirichlet"] + mu, dim=-1)
    acc = torch.zeros_like(A.T)
    for i in range(n):
        acc = acc + w[i] * (A.T + scaler * sample["z_mvn"][i] @ L)
    return acc.T, cov, w


def test_sampled_weight_matches_plain_formula() -> None:
    torch.manual_seed(1)
    sampler = MontecloraSampler(IN, R, MontecloraConfig(**_mc()), torch.device("cpu"), torch.float32)
    A = torch.randn(R, IN)
    sample = _sample(5, IN)
    from peftkit.methods.lora.monteclora import sampled_weight

    got = sampled_weight(A, sampler, sample)
    want, cov, w = plain_sampled_A(A, sampler.std_prior.detach(), sampler.expert_weights_prior.detach(), 0.3, sample)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(sampler.gaussian_var_prior, cov, **TOL)
    torch.testing.assert_close(sampler.expert_weights, w, **TOL)


@pytest.mark.filterwarnings("ignore:Singular sample detected")  # torch's own Wishart, drawn for comparison
def test_wishart_draw_has_the_reference_distribution() -> None:
    """``W ~ Wishart(df=r, I)``: ``E[W] = r I`` and ``Var[W_ij] = r (1 + δ_ij)``, matched by torch's own ``Wishart``
    (what the reference samples from) to within the Monte-Carlo error of 20000 draws."""
    from peftkit.methods.lora.monteclora import wishart_identity

    r, n = 3, 20000
    torch.manual_seed(0)
    ours = torch.stack([wishart_identity(r, torch.device("cpu")) for _ in range(n)])
    theirs = torch.distributions.Wishart(df=torch.tensor(float(r)), scale_tril=torch.eye(r)).sample((n,))
    for draws in (ours, theirs):
        torch.testing.assert_close(draws.mean(0), r * torch.eye(r), atol=0.15, rtol=0)  # 5 sd of a mean: ~0.12
        torch.testing.assert_close(draws.var(0), r * (1 + torch.eye(r)), atol=0.6, rtol=0.1)
        assert (torch.linalg.eigvalsh(draws) > 0).float().mean() > 0.99


def test_forward_eval_is_plain_lora_and_training_uses_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit)))
    x = _x()
    layer = pm.base_model.model.a
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    base = layer.base_layer
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + 2.0 * (x @ A.T) @ B.T, **TOL)  # scaling = 4 / 2
    pm.train()
    sample = _sample(11, IN)
    sampler = layer.lora_monteclora_sampler["default"]
    monkeypatch.setattr(sampler, "draw", lambda: sample)
    A2, _, _ = plain_sampled_A(A, sampler.std_prior.detach(), sampler.expert_weights_prior.detach(), 0.3, sample)
    torch.testing.assert_close(layer(x).detach(), base(x).detach() + 2.0 * (x @ A2.T) @ B.T, **TOL)


def test_training_draws_fresh_noise_each_forward() -> None:
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit)))
    pm.train()
    x = _x()
    assert not torch.equal(pm(x), pm(x))
    pm.eval()
    assert torch.equal(pm(x), pm(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_at_init(mode: str) -> None:
    net = _net()
    x = _x()
    want = net(x).detach()
    pm = peftkit.get_peft_model(net, _config(peftkit))
    getattr(pm, mode)()
    torch.testing.assert_close(pm(x).detach(), want, rtol=0, atol=0)  # lora_B == 0: the update is exactly zero


def test_sampler_parameters_train_and_loss_is_the_references_formula() -> None:
    pm = peftkit.get_peft_model(_net(), _config(peftkit, monteclora_config=_mc(use_entropy=True)))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.model.a.lora_monteclora_sampler.default.std_prior" in trainable
    assert "base_model.model.a.lora_monteclora_sampler.default.expert_weights_prior" in trainable
    pm.train()
    pm(_x()).sum().backward()
    loss = pm._get_monteclora_loss()
    terms = []
    for name in ("a", "b"):
        s = pm.base_model.model.get_submodule(name).lora_monteclora_sampler["default"]
        alpha2, alpha1 = torch.exp(s.expert_weights_prior), torch.full((N,), 0.1)
        lg = torch.lgamma
        kl1 = (lg(alpha2.sum()) - lg(alpha1.sum()) + (lg(alpha2) - lg(alpha1)).sum()
               + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum())
        var = torch.exp(s.std_prior) ** 2
        kl2 = 0.5 * (-torch.log(var).sum() * R + var.sum() * R - R**2)
        g = torch.clamp(s.gaussian_var_prior, min=1e-6)
        kl3 = N * 0.5 * (torch.diagonal(g).sum() - torch.log(torch.diagonal(g)).sum() - R)
        terms.append(1e-5 * (kl1 + kl2 + kl3) + (s.expert_weights**2).sum())
    torch.testing.assert_close(loss, sum(terms) / 2, **TOL)
    assert loss.requires_grad
    copy.deepcopy(pm)  # a trained model copies (the reference's does not: its buffers hold non-leaf tensors)
    pm.eval()
    assert pm._get_monteclora_loss() == 0.0


# ---------------------------------------------------------------------------- interop with the reference
def _ref_from(path: Path) -> nn.Module:
    return peft.PeftModel.from_pretrained(_net(), str(path))


def _ours_from(path: Path) -> nn.Module:
    return peftkit.PeftModel.from_pretrained(_net(), str(path))


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        assert value.shape == b[k].shape, k
        torch.testing.assert_close(value, b[k], rtol=0, atol=0)  # stored tensors, no arithmetic


def test_peftkit_file_loads_in_reference(tmp_path: Path) -> None:
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit))).eval()
    pm.save_pretrained(tmp_path)
    ref = _ref_from(tmp_path).eval()
    assert ref.peft_config["default"].monteclora_config == peft.MontecloraConfig(**_mc())
    _same_state(peftkit.get_peft_model_state_dict(pm), peft.get_peft_model_state_dict(ref))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref(x), **TOL)


def test_reference_file_loads_in_peftkit(tmp_path: Path) -> None:
    ref = _perturbed(peft.get_peft_model(_net(), _config(peft, monteclora_config=peft.MontecloraConfig(**_mc()))))
    ref.eval()
    ref.save_pretrained(tmp_path)
    pm = _ours_from(tmp_path).eval()
    assert pm.peft_config["default"].monteclora_config == MontecloraConfig(**_mc())
    _same_state(peftkit.get_peft_model_state_dict(pm), peft.get_peft_model_state_dict(ref))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref(x), **TOL)


@pytest.mark.parametrize("seed_a", [0, 40])  # fixed samples (str hashes change between processes)
def test_training_forward_and_loss_match_reference_for_a_shared_sample(tmp_path: Path, seed_a: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _perturbed(peft.get_peft_model(_net(), _config(peft, monteclora_config=peft.MontecloraConfig(
        **_mc(use_entropy=True)))))
    ref.save_pretrained(tmp_path)
    pm = peftkit.PeftModel.from_pretrained(_net(), str(tmp_path), is_trainable=True)
    for seed, name, in_features in ((seed_a, "a", IN), (seed_a + 1, "b", HID)):
        sample = _sample(seed, in_features)
        theirs = ref.base_model.model.get_submodule(name).lora_monteclora_sampler["default"]
        monkeypatch.setattr(theirs.sampler, "get", lambda s=sample: s)
        ours = pm.base_model.model.get_submodule(name).lora_monteclora_sampler["default"]
        monkeypatch.setattr(ours, "draw", lambda s=sample: s)
    ref.train()
    pm.train()
    x = _x()
    ours_out, ref_out = pm(x), ref(x)
    torch.testing.assert_close(ours_out, ref_out, **TOL)
    ours_loss, ref_loss = pm._get_monteclora_loss(), ref.base_model._get_monteclora_loss()
    torch.testing.assert_close(ours_loss, ref_loss, **TOL)
    (ours_out.square().sum() + ours_loss).backward()
    (ref_out.square().sum() + ref_loss).backward()
    ours_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(ours_grads) == sorted(ref_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL)


def test_merge_matches_plain_lora_and_reference(tmp_path: Path) -> None:
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit, lora_bias=True))).eval()
    x = _x()
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(tmp_path)
    merged = pm.merge_and_unload()
    ref_merged = _ref_from(tmp_path).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, **TOL)
        torch.testing.assert_close(merged.a.weight, ref_merged.a.weight, **TOL)
        torch.testing.assert_close(merged.a.bias, ref_merged.a.bias, **TOL)


def test_merge_unmerge_round_trip() -> None:
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit))).eval()
    w0 = pm.base_model.model.a.base_layer.weight.detach().clone()
    x = _x()
    with torch.no_grad():
        want = pm(x)
        pm.base_model.merge_adapter()
        torch.testing.assert_close(pm(x), want, **TOL)
        pm.base_model.unmerge_adapter()
    torch.testing.assert_close(pm.base_model.model.a.base_layer.weight, w0, **TOL)


# ---------------------------------------------------------------------------- validation
def test_save_load_round_trip(tmp_path: Path) -> None:
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit))).eval()
    pm.save_pretrained(tmp_path)
    back = _ours_from(tmp_path).eval()
    _same_state(peftkit.get_peft_model_state_dict(pm), peftkit.get_peft_model_state_dict(back))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(back(x), pm(x), rtol=0, atol=0)  # same weights, same kernels


@pytest.mark.parametrize(("key", "value", "exc"), [("num_samples", 0, ConfigError), ("dirichlet_prior", 0.0, ConfigError),
                                                   ("num_samples", 2.5, ConfigTypeError),
                                                   ("use_entropy", "yes", ConfigTypeError)])
def test_bad_subconfig_names_the_field(key: str, value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=f"monteclora_config.{key}"):
        peftkit.LoraConfig(monteclora_config={key: value})


def test_unknown_subconfig_key_and_non_linear_target_and_dora_are_rejected() -> None:
    with pytest.raises(ConfigError, match="monteclora_config"):
        peftkit.LoraConfig(monteclora_config={"nope": 1})

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(ConfigError, match="monteclora_config"):
        peftkit.get_peft_model(Emb(), peftkit.LoraConfig(target_modules=["emb"], monteclora_config={}))
    with pytest.raises(ConfigError):
        peftkit.get_peft_model(_net(), _config(peftkit, use_dora=True))


def test_megatron_config_is_rejected_by_name() -> None:
    """Megatron tensor-parallel LoRA is not implemented (README: differences on purpose)."""
    with pytest.raises(ConfigError, match="megatron_config"):
        peftkit.get_peft_model(_net(), peftkit.LoraConfig(target_modules=["a"], megatron_config={"tp": 2}))



def test_quantized_linear_gets_plain_lora_as_the_reference(tmp_path: Path) -> None:
    """The reference's bitsandbytes LoRA layers (what a transformers-quantized model gets) have no MonteCLoRA: their
    ``resolve_lora_variant`` ignores ``monteclora_config``, so those layers are plain LoRA with no sampler keys.
    peftkit does the same, with a warning naming the layers, so files move both ways."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path / "base")

    def quantized() -> nn.Module:
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu",
                                                quantization_config=BitsAndBytesConfig(
                                                    load_in_8bit=True, llm_int8_skip_modules=["o_proj", "lm_head"]))

    def config(lib: object, mc: object) -> object:
        return lib.LoraConfig(r=R, target_modules=["q_proj", "o_proj"], monteclora_config=mc)

    with pytest.warns(peftkit.PeftWarning, match=r"MonteCLoRA is not applied to the quantized layers.*q_proj"):
        pm = _perturbed(peftkit.get_peft_model(quantized(), config(peftkit, _mc()))).eval()
    keys = set(peftkit.get_peft_model_state_dict(pm))
    assert not any("q_proj.lora_monteclora" in k for k in keys)
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_monteclora_sampler.std_prior" in keys
    ref = peft.get_peft_model(quantized(), config(peft, peft.MontecloraConfig(**_mc())))
    assert set(peft.get_peft_model_state_dict(ref)) == keys
    pm.save_pretrained(tmp_path / "ours")
    ref = peft.PeftModel.from_pretrained(quantized(), str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the same int8 kernels on both sides: the tolerance of tests/test_quantized.py (REF_ATOL)
        torch.testing.assert_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, atol=2e-4, rtol=2e-4)


def test_top_level_config_and_trainer_mixin() -> None:
    """``peftkit.MontecloraConfig`` and ``peftkit.helpers.MontecloraTrainerMixin`` as the reference's: the mixin
    adds ``_get_monteclora_loss()`` to the parent ``compute_loss``."""
    from peftkit.helpers import MontecloraTrainerMixin

    assert peftkit.MontecloraConfig is MontecloraConfig

    class Parent:
        def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         **kwargs: object) -> object:
            out = model(inputs["x"])
            loss = out.square().mean()
            return (loss, out) if return_outputs else loss

    class Trainer(MontecloraTrainerMixin, Parent):
        pass

    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit)))
    for layer in (pm.base_model.model.a, pm.base_model.model.b):  # a fixed sample: both calls see the same noise
        sample = _sample(3, layer.in_features)
        layer.lora_monteclora_sampler["default"].draw = lambda s=sample: s
    pm.train()
    inputs = {"x": _x()}
    task = Parent().compute_loss(pm, inputs)
    loss, out = Trainer().compute_loss(pm, inputs, return_outputs=True)
    torch.testing.assert_close(loss, task + pm._get_monteclora_loss(), **TOL)
    assert out.shape == (4, OUT)
    plain = peftkit.get_peft_model(_net(), peftkit.LoraConfig(target_modules=["a"]))
    torch.testing.assert_close(Trainer().compute_loss(plain, inputs), Parent().compute_loss(plain, inputs))


def test_nan_sample_falls_back_to_lora_A_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the reference: a sample whose weights come out NaN is dropped (``A`` unchanged), with a warning."""
    pm = _perturbed(peftkit.get_peft_model(_net(), _config(peftkit))).train()
    layer = pm.base_model.model.a
    sample = {**_sample(2, IN), "z_dirichlet": torch.full((N,), float("nan"))}
    monkeypatch.setattr(layer.lora_monteclora_sampler["default"], "draw", lambda: sample)
    x = _x()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    with pytest.warns(peftkit.PeftWarning, match="NaNs"):
        out = layer(x).detach()
    torch.testing.assert_close(out, layer.base_layer(x).detach() + 2.0 * (x @ A.T) @ B.T, **TOL)
