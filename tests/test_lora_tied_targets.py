"""``LoraConfig(ensure_weight_tying=True)`` with LoRA on tied input/output embeddings (``tie_word_embeddings=True``):
the adapter goes on the input embedding and the tied output head applies the same update with the embedding's
factors, transposed (as the reference). Files interoperate with the reference both ways under the reference's keys
(the head's ``lora_A`` / ``lora_B`` included) and config (``target_modules`` rewritten); peftkit's head holds no
second parameter (one gradient, counted once) and merging adds the update to the shared weight once (the reference
adds it twice: README, deliberate differences)."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import AdapterLoadError, ConfigError, PeftWarning
from peftkit.methods.lora.tied import TiedFactor, TiedLinear
from peftkit.ops.lora_fused import dropout_mask
from tests.lora_variant_helpers import logits as _logits
from tests.lora_variant_helpers import perturb_adapter
from tests.lora_variant_helpers import quiet as _quiet
from tests.lora_variant_helpers import saved_keys as _keys
from tests.lora_variant_helpers import tiny_llama_tied as _model
from tests.lora_variant_helpers import token_ids as _inputs
from tests.models import tiny_gpt2
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")

#: both libraries compute the same forward (the same rank-r updates, the same transformer) with their own code paths
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
P = "base_model.model."
HEAD_KEYS = {f"{P}lm_head.lora_A.weight", f"{P}lm_head.lora_B.weight"}
EMB_KEYS = {f"{P}model.embed_tokens.lora_embedding_A", f"{P}model.embed_tokens.lora_embedding_B"}
Q_KEYS = {f"{P}model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"}

#: target_modules selecting a tied module: the embedding by its short name, the head only, and regexes
TARGETS = [["q_proj", "embed_tokens"], ["q_proj", "lm_head"], ["lm_head"], "q_proj|embed_tokens", ".*lm_head"]
IDS = ["embed", "head", "head-only", "regex-embed", "regex-head"]


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Make every LoRA tensor non-trivial (each storage once: the reference's head factors view the embedding's)."""
    perturb_adapter(model, seed, 0.5, ("lora_",))


def _config(lib: object, targets: object, ewt: bool = True, **kwargs: object) -> object:
    return lib.LoraConfig(target_modules=targets, ensure_weight_tying=ewt, r=4, lora_alpha=8, **kwargs)


def _stored_targets(path: str) -> object:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        targets = json.load(fh)["target_modules"]
    return targets if isinstance(targets, str) else set(targets)


def _kit(targets: object, **kwargs: object) -> peftkit.PeftModel:
    return peftkit.get_peft_model(_model(), _config(peftkit, targets, **kwargs))


def _ref(targets: object, **kwargs: object) -> object:
    return _quiet(peft.get_peft_model, _model(), _config(peft, targets, **kwargs))


# ------------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("targets", TARGETS, ids=IDS)
def test_structure_keys_and_config_equal_reference(targets: object, tmp_path) -> None:
    config = _config(peftkit, targets)
    given = copy.deepcopy(config.target_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)  # tied on purpose: no "one tied module" warning
        kit = peftkit.get_peft_model(_model(), config)
    ref = _ref(targets)
    head, emb = kit.base_model.model.lm_head, kit.base_model.model.model.embed_tokens
    assert isinstance(head, TiedLinear) and isinstance(head.lora_A["default"], TiedFactor)
    assert head.get_base_layer().weight is emb.get_base_layer().weight
    # the head's factors are the embedding's parameters, transposed, with no tensor of their own
    assert torch.equal(head.lora_A["default"].weight, emb.lora_embedding_B["default"].t())
    assert torch.equal(head.lora_B["default"].weight, emb.lora_embedding_A["default"].t())
    assert not list(head.lora_A.parameters()) and not list(head.lora_B.parameters())
    kit.save_pretrained(str(tmp_path / "kit"), save_embedding_layers=False)
    _quiet(ref.save_pretrained, str(tmp_path / "ref"), save_embedding_layers=False)
    assert _keys(str(tmp_path / "kit")) == _keys(str(tmp_path / "ref"))
    assert HEAD_KEYS | EMB_KEYS <= _keys(str(tmp_path / "kit"))
    assert _stored_targets(str(tmp_path / "kit")) == _stored_targets(str(tmp_path / "ref"))
    # the stored copy records the rewrite; the user's config is unchanged
    assert config.target_modules == given
    assert "model.embed_tokens" in str(kit.peft_config["default"].target_modules).replace("\\", "")
    assert kit.peft_config["default"].target_modules == _stored_targets(str(tmp_path / "kit"))


def test_trainable_parameters_counted_once_unlike_reference() -> None:
    kit, ref = _kit(["q_proj", "embed_tokens"]), _ref(["q_proj", "embed_tokens"])
    kit_names = [n for n, p in kit.named_parameters() if p.requires_grad]
    ref_names = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert not any("lm_head" in n for n in kit_names)
    assert sorted(kit_names) == sorted(n for n in ref_names if "lm_head" not in n)
    # the reference's trainable tensors, each storage once (its head's factors view the embedding's)
    storages = {p.untyped_storage().data_ptr(): p for p in ref.parameters() if p.requires_grad}
    ref_unique = sum(p.numel() for p in storages.values())
    assert len(storages) == len(kit_names)
    assert kit.get_nb_trainable_parameters()[0] == ref_unique  # the reference counts the head's views again
    assert ref.get_nb_trainable_parameters()[0] > ref_unique


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("targets", TARGETS, ids=IDS)
def test_peftkit_file_loads_in_reference(targets: object, tmp_path) -> None:
    kit = _kit(targets)
    _perturb(kit)
    kit.save_pretrained(str(tmp_path))
    ref = _quiet(peft.PeftModel.from_pretrained, _model(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(ref), _logits(kit), **TOL)


@pytest.mark.parametrize("targets", TARGETS, ids=IDS)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["alloc", "meta"])
def test_reference_file_loads_in_peftkit(targets: object, low_cpu_mem_usage: bool, tmp_path) -> None:
    ref = _ref(targets)
    _perturb(ref, seed=2)
    _quiet(ref.save_pretrained, str(tmp_path))
    kit = peftkit.PeftModel.from_pretrained(_model(), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert isinstance(kit.base_model.model.lm_head, TiedLinear)
    torch.testing.assert_close(_logits(kit), _logits(ref.eval()), **TOL)


def test_reference_file_loads_for_training_in_peftkit(tmp_path) -> None:
    ref = _ref(["q_proj", "embed_tokens"])
    _perturb(ref, seed=3)
    _quiet(ref.save_pretrained, str(tmp_path))
    kit = peftkit.PeftModel.from_pretrained(_model(), str(tmp_path), is_trainable=True).eval()
    torch.testing.assert_close(_logits(kit), _logits(ref.eval()), **TOL)


def test_file_with_inconsistent_head_factor_is_refused(tmp_path) -> None:
    kit = _kit(["q_proj", "embed_tokens"])
    _perturb(kit)
    kit.save_pretrained(str(tmp_path))
    path = os.path.join(str(tmp_path), "adapter_model.safetensors")
    tensors = load_file(path)
    tensors[f"{P}lm_head.lora_A.weight"] = tensors[f"{P}lm_head.lora_A.weight"] + 1
    from safetensors.torch import save_file

    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match="lm_head.lora_A.weight"):
        peftkit.PeftModel.from_pretrained(_model(), str(tmp_path))


# ------------------------------------------------------------------------------------------------ forward paths


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_head_forward_equals_reference(dropout: float, grad: bool, train: bool, tmp_path) -> None:
    """The head's output in every mode equals the reference's; with active dropout (train, p > 0) the libraries
    draw different masks, so the head is compared with ``base(x) + s * dropout(x) @ B_e @ A_e`` under the mask
    peftkit draws (:func:`peftkit.ops.lora_fused.dropout_mask`, from the same seed)."""
    ref = _ref(["q_proj", "embed_tokens"], lora_dropout=dropout)
    _perturb(ref)
    _quiet(ref.save_pretrained, str(tmp_path))
    kit = peftkit.PeftModel.from_pretrained(_model(), str(tmp_path), is_trainable=True)
    kit.train(train)
    ref.train(train)
    x = torch.randn(2, 5, 32)
    head = kit.base_model.model.lm_head
    with torch.set_grad_enabled(grad):
        torch.manual_seed(5)
        out = head(x)
        if dropout and train:
            emb = kit.base_model.model.model.embed_tokens
            A, B = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
            torch.manual_seed(5)
            mask, keep = dropout_mask((10, 32), dropout, x.device)
            x2d = x.reshape(10, 32)
            base = x2d @ head.get_base_layer().weight.t()
            expected = (base + ((x2d * mask / keep) @ B @ A) * head.scaling["default"]).reshape(2, 5, -1)
            assert not torch.allclose(out, ref.base_model.model.lm_head.eval()(x), **TOL)  # dropout did apply
        else:
            expected = ref.base_model.model.lm_head(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert out.requires_grad == grad


def test_head_dropout_applies_in_training_only() -> None:
    kit = _kit(["embed_tokens"], lora_dropout=0.5)
    _perturb(kit)
    head = kit.base_model.model.lm_head
    x = torch.randn(4, 32)
    kit.eval()
    with torch.no_grad():
        full = head(x)
        base = head.get_base_layer()(x)
    kit.train()
    torch.manual_seed(0)
    dropped = head(x)
    assert not torch.allclose(dropped, full) and not torch.allclose(dropped, base)
    kit.eval()
    torch.testing.assert_close(head(x), full)


# ------------------------------------------------------------------------------------------------ training


def test_one_gradient_equal_to_the_reference_sum_and_a_step_keeps_tying(tmp_path) -> None:
    """peftkit's embedding factors get the gradient of both uses (the reference splits it over the embedding's
    parameter and the head's view of it); an SGD step then gives both libraries the same model."""
    ref = _ref(["q_proj", "embed_tokens"])
    _perturb(ref)
    _quiet(ref.save_pretrained, str(tmp_path))
    kit = peftkit.PeftModel.from_pretrained(_model(), str(tmp_path), is_trainable=True)
    kit.train()
    ref.train()
    kit(_inputs(), labels=_inputs()).loss.backward()
    ref(_inputs(), labels=_inputs()).loss.backward()
    emb, ref_emb = kit.base_model.model.model.embed_tokens, ref.base_model.model.model.embed_tokens
    ref_head = ref.base_model.model.lm_head
    gB = ref_emb.lora_embedding_B["default"].grad + ref_head.lora_A["default"].weight.grad.t()
    gA = ref_emb.lora_embedding_A["default"].grad + ref_head.lora_B["default"].weight.grad.t()
    torch.testing.assert_close(emb.lora_embedding_B["default"].grad, gB, **TOL)
    torch.testing.assert_close(emb.lora_embedding_A["default"].grad, gA, **TOL)
    for model in (kit, ref):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    head = kit.base_model.model.lm_head
    assert torch.equal(head.lora_A["default"].weight, emb.lora_embedding_B["default"].t())
    kit.eval()
    ref.eval()
    torch.testing.assert_close(_logits(kit), _logits(ref), **TOL)


# ------------------------------------------------------------------------------------------------ merging


def test_merge_adds_the_update_once_unlike_reference() -> None:
    kit, ref = _kit(["q_proj", "embed_tokens"]), _ref(["q_proj", "embed_tokens"])
    _perturb(kit)
    _perturb(ref)
    emb = kit.base_model.model.model.embed_tokens
    weight = emb.get_base_layer().weight
    before, delta = weight.detach().clone(), emb.get_delta_weight("default").detach()
    expected = _logits(kit)
    kit.merge_adapter()
    torch.testing.assert_close(weight, before + delta, **TOL)
    torch.testing.assert_close(_logits(kit), expected, **TOL)
    kit.unmerge_adapter()
    torch.testing.assert_close(weight, before, **TOL)
    torch.testing.assert_close(_logits(kit), expected, **TOL)
    merged = kit.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged), expected, **TOL)
    # the reference merges the shared weight from both layers: the update twice
    ref_weight = ref.base_model.model.model.embed_tokens.get_base_layer().weight
    ref_before = ref_weight.detach().clone()
    ref_delta = ref.base_model.model.model.embed_tokens.get_delta_weight("default").detach()
    ref.merge_adapter()
    torch.testing.assert_close(ref_weight, ref_before + 2 * ref_delta, **TOL)


def test_merge_of_either_layer_alone_keeps_outputs() -> None:
    kit = _kit(["q_proj", "embed_tokens"])
    _perturb(kit)
    kit.eval()
    expected = _logits(kit)
    emb, head = kit.base_model.model.model.embed_tokens, kit.base_model.model.lm_head
    weight = emb.get_base_layer().weight
    before = weight.detach().clone()
    for layer in (emb, head):
        layer.merge()
        assert emb.merged_adapters == ["default"]
        torch.testing.assert_close(_logits(kit), expected, **TOL)
        head.unmerge()
        emb.unmerge()
        torch.testing.assert_close(weight, before, **TOL)
    kit.merge_adapter()
    emb.unmerge()  # the embedding alone: the head (still listing the adapter as merged) adds the update again
    torch.testing.assert_close(_logits(kit), expected, **TOL)
    kit.unmerge_adapter()
    torch.testing.assert_close(weight, before, **TOL)
    kit.merge_adapter()
    with kit.disable_adapter():
        torch.testing.assert_close(_logits(kit), _logits(peftkit.get_peft_model(_model(), _config(
            peftkit, ["q_proj"])).get_base_model()), **TOL)
    torch.testing.assert_close(weight, before, **TOL)


# ------------------------------------------------------------------------------------------------ other configs


def test_without_ensure_weight_tying_embedding_only_and_warns_like_reference(tmp_path) -> None:
    with pytest.warns(PeftWarning, match="tie_word_embeddings"):
        kit = peftkit.get_peft_model(_model(), _config(peftkit, ["q_proj", "embed_tokens"], ewt=False))
    assert type(kit.base_model.model.lm_head) is nn.Linear
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        ref = peft.get_peft_model(_model(), _config(peft, ["q_proj", "embed_tokens"], ewt=False))
    _perturb(kit)
    kit.save_pretrained(str(tmp_path / "kit"), save_embedding_layers=False)
    _quiet(ref.save_pretrained, str(tmp_path / "ref"), save_embedding_layers=False)
    assert _keys(str(tmp_path / "kit")) == _keys(str(tmp_path / "ref"))
    loaded = _quiet(peft.PeftModel.from_pretrained, _model(), str(tmp_path / "kit")).eval()
    torch.testing.assert_close(_logits(loaded), _logits(kit), **TOL)


def test_ensure_weight_tying_on_untied_model_warns_and_does_not_tie() -> None:
    with pytest.warns(PeftWarning, match="ensure_weight_tying"):
        kit = peftkit.get_peft_model(_model(tied=False), _config(peftkit, ["q_proj", "embed_tokens"]))
    assert type(kit.base_model.model.lm_head) is nn.Linear


def test_second_tied_adapter_and_switching(tmp_path) -> None:
    """Two tied adapters on one model: each gives the outputs the reference gives it alone (the reference's own
    ``load_adapter`` of a second tied adapter leaves the head without it: README, deliberate differences)."""
    expected = []
    for i, seed in enumerate((1, 2)):
        ref = _ref(["q_proj", "embed_tokens"])
        _perturb(ref, seed)
        _quiet(ref.save_pretrained, str(tmp_path / f"a{i}"))
        expected.append(_logits(ref.eval()))
    kit = peftkit.PeftModel.from_pretrained(_model(), str(tmp_path / "a0")).eval()
    kit.load_adapter(str(tmp_path / "a1"), adapter_name="other")
    head = kit.base_model.model.lm_head
    assert set(head.tied_adapters) == {"default", "other"}
    for name, logits in zip(("default", "other"), expected):
        kit.set_adapter(name)
        torch.testing.assert_close(_logits(kit), logits, **TOL)
    ref = _quiet(peft.PeftModel.from_pretrained, _model(), str(tmp_path / "a0")).eval()
    _quiet(ref.load_adapter, str(tmp_path / "a1"), adapter_name="other")
    assert "other" not in ref.base_model.model.lm_head.lora_A  # the reference's head misses the second adapter


@pytest.mark.parametrize(("kwargs", "field"), [({"use_dora": True}, "use_dora"),
                                                ({"init_lora_weights": "pissa"}, "init_lora_weights"),
                                                ({"modules_to_save": ["embed_tokens"]}, "ensure_weight_tying")])
def test_unsupported_combinations_are_refused(kwargs: dict[str, object], field: str) -> None:
    base = _model()
    targets = ["q_proj", "lm_head"]
    with pytest.raises(ConfigError, match=field):
        peftkit.get_peft_model(base, _config(peftkit, targets, **kwargs))
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding


def test_embedding_name_the_reference_does_not_recognise_ties_and_warns(tmp_path) -> None:
    """GPT-2 ties ``transformer.wte`` and ``lm_head``: the stored targets name ``wte``, which the reference does not
    take for an embedding when it loads the file; peftkit ties and says so."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    if not getattr(model.config, "tie_word_embeddings", False) or model.lm_head.weight is not model.transformer.wte.weight:
        pytest.skip("tiny_gpt2 does not tie its embeddings")
    with pytest.warns(PeftWarning, match="does not recognise"):
        kit = peftkit.get_peft_model(model, peftkit.LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True))
    assert isinstance(kit.base_model.model.lm_head, TiedLinear)
    assert kit.peft_config["default"].target_modules == {"transformer.wte"}


def test_mixed_batch_second_adapter_deepcopy_and_compile() -> None:
    kit = _kit(["q_proj", "embed_tokens"])
    _perturb(kit)
    kit.add_adapter("other", _config(peftkit, ["q_proj", "embed_tokens"]))
    _perturb(kit, seed=7)
    kit.eval()
    outs = {}
    for name in ("default", "other"):
        kit.set_adapter(name)
        outs[name] = _logits(kit)
    with kit.disable_adapter():
        outs["__base__"] = _logits(kit)
    names = ["other", "__base__"]
    with torch.no_grad():
        mixed = kit(_inputs(), adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outs[name][row], **TOL)
    kit.set_adapter("default")
    twin = copy.deepcopy(kit)
    torch.testing.assert_close(_logits(twin), outs["default"], **TOL)
    assert twin.base_model.model.lm_head.tied_adapters["default"] is twin.base_model.model.model.embed_tokens
    head, x = kit.base_model.model.lm_head, torch.randn(3, 32)
    torch.testing.assert_close(torch.compile(head, backend="eager")(x), head(x), **TOL)


def test_hotswap_of_reference_file(tmp_path) -> None:
    expected = None
    for i, seed in enumerate((1, 2)):
        ref = _ref(["q_proj", "embed_tokens"])
        _perturb(ref, seed)
        _quiet(ref.save_pretrained, str(tmp_path / f"a{i}"), save_embedding_layers=False)
        expected = _logits(ref.eval())
    kit = peftkit.PeftModel.from_pretrained(_model(), str(tmp_path / "a0")).eval()
    peftkit.hotswap_adapter(kit, str(tmp_path / "a1"), adapter_name="default")
    torch.testing.assert_close(_logits(kit), expected, **TOL)
