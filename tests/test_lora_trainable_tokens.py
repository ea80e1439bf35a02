"""LoRA with ``trainable_token_indices`` (TrainableTokens rows trained beside the LoRA layers, under the same adapter
name) and ``ensure_weight_tying``: files interoperate with the reference both ways, with untied and tied
input/output embeddings; the saved keys are the reference's (``<module>.token_adapter.trainable_tokens_delta``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, ConfigTypeError, NoMatchingPeftModuleError
from peftkit.methods.trainable_tokens import TrainableTokensLayer
from tests.lora_variant_helpers import logits as _logits
from tests.lora_variant_helpers import perturb_adapter
from tests.lora_variant_helpers import quiet as _quiet
from tests.lora_variant_helpers import saved_keys as _keys
from tests.lora_variant_helpers import tiny_llama_tied as _model
from tests.lora_variant_helpers import token_ids as _inputs
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")

INDICES = [3, 5, 60]
#: both libraries compute the same forward (rows replaced, rank-r updates, the same transformer) with their own code
#: paths, so results agree to a few ulp per term of the longest reduction
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
P = "base_model.model."
LORA_KEYS = {f"{P}model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"}
EMB_KEY = f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_KEY = f"{P}lm_head.token_adapter.trainable_tokens_delta"

#: (trainable_token_indices, ensure_weight_tying): the list form, the dict form naming the embedding, both tied
#: modules with the same rows, and (ensure_weight_tying=False only) different rows for the head
CASES = [
    (INDICES, False),
    (INDICES, True),
    ({"embed_tokens": INDICES}, False),
    ({"embed_tokens": INDICES}, True),
    ({"embed_tokens": INDICES, "lm_head": INDICES}, False),
    ({"embed_tokens": INDICES, "lm_head": INDICES}, True),
    ({"embed_tokens": INDICES, "lm_head": [3, 7]}, False),
]
IDS = ["list", "list-ewt", "dict", "dict-ewt", "both", "both-ewt", "both-different"]


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Make every adapter tensor non-trivial (token rows and both LoRA factors)."""
    perturb_adapter(model, seed, 0.5, ("trainable_tokens_delta", "lora_"))


def _config(lib: object, indices: object, ewt: bool, **kwargs: object) -> object:
    return lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices, ensure_weight_tying=ewt,
                          **kwargs)


# ------------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("indices", "ewt"), CASES, ids=IDS)
def test_save_keys_and_trainable_names_equal_reference(tied: bool, indices: object, ewt: bool, tmp_path) -> None:
    kit = _quiet(peftkit.get_peft_model, _model(tied), _config(peftkit, indices, ewt))
    ref = _quiet(peft.get_peft_model, _model(tied), _config(peft, indices, ewt))
    kit.save_pretrained(str(tmp_path / "kit"))
    ref.save_pretrained(str(tmp_path / "ref"))
    assert _keys(str(tmp_path / "kit")) == _keys(str(tmp_path / "ref"))
    assert EMB_KEY in _keys(str(tmp_path / "kit")) and LORA_KEYS <= _keys(str(tmp_path / "kit"))
    kit_rows = {n.replace(".token_adapter", "") for n, p in kit.named_parameters() if p.requires_grad}
    ref_rows = {n.replace(".token_adapter", "") for n, p in ref.named_parameters() if p.requires_grad}
    assert kit_rows == ref_rows  # peftkit holds the rows one level up (README); the names are otherwise the same
    head_tied = tied and not (isinstance(indices, dict) and indices.get("lm_head") not in (None, INDICES))
    head = kit.base_model.model.lm_head
    assert isinstance(head, TrainableTokensLayer) == (head_tied or (isinstance(indices, dict) and "lm_head" in indices))
    if head_tied:
        assert head.tied_adapter is kit.base_model.model.model.embed_tokens


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("indices", "ewt"), CASES, ids=IDS)
def test_peftkit_file_loads_in_reference(tied: bool, indices: object, ewt: bool, tmp_path) -> None:
    kit = _quiet(peftkit.get_peft_model, _model(tied), _config(peftkit, indices, ewt))
    _perturb(kit)
    kit.save_pretrained(str(tmp_path))
    ref = _quiet(peft.PeftModel.from_pretrained, _model(tied), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(ref), _logits(kit), **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("indices", "ewt"), CASES, ids=IDS)
def test_reference_file_loads_in_peftkit(tied: bool, indices: object, ewt: bool, tmp_path) -> None:
    ref = _quiet(peft.get_peft_model, _model(tied), _config(peft, indices, ewt))
    _perturb(ref)
    ref.save_pretrained(str(tmp_path))
    kit = _quiet(peftkit.PeftModel.from_pretrained, _model(tied), str(tmp_path)).eval()
    assert kit.peft_config["default"].trainable_token_indices == indices
    torch.testing.assert_close(_logits(kit), _logits(ref.eval()), **TOL)


def test_identity_at_init() -> None:
    base = _model(True)
    expected = _logits(base)
    model = peftkit.get_peft_model(base, _config(peftkit, INDICES, True))
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)  # same rows, B = 0: the base kernels


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_only_chosen_rows_change_in_training(tied: bool) -> None:
    model = peftkit.get_peft_model(_model(tied), _config(peftkit, {"embed_tokens": INDICES}, tied))
    embedding = model.base_model.model.model.embed_tokens
    weight = embedding.get_base_layer().weight
    before = weight.detach().clone()
    rows_before = embedding.trainable_tokens_delta["default"].detach().clone()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(_inputs(), labels=_inputs()).loss.backward()
        optimizer.step()
    assert weight.grad is None and torch.equal(weight, before)  # the base embedding never trains
    rows = embedding.trainable_tokens_delta["default"].detach()
    assert (rows - rows_before).abs().amax(dim=1).gt(0).all()  # every chosen row trained
    model.eval()
    emb = embedding(torch.arange(128))
    untouched = [i for i in range(128) if i not in INDICES]
    assert torch.equal(emb[untouched], before[untouched])  # the other rows are the base rows, exactly
    torch.testing.assert_close(emb[INDICES], rows, atol=0, rtol=0)  # copied rows, no arithmetic
    if tied:  # the tied head scores with the trained rows
        hidden = torch.randn(2, 32)
        head = model.base_model.model.lm_head(hidden)
        torch.testing.assert_close(head[:, INDICES], hidden @ rows.T, **TOL)
        torch.testing.assert_close(head[:, untouched], hidden @ before[untouched].T, **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merge_and_unload_equals_unmerged(tied: bool) -> None:
    model = peftkit.get_peft_model(_model(tied), _config(peftkit, INDICES, tied))
    _perturb(model)
    rows = model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].detach().clone()
    expected = _logits(model)
    merged = model.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding and type(merged.lm_head) is nn.Linear
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(merged.model.embed_tokens.weight[INDICES], rows)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    # merged: W + scaling * B @ A in one matmul against two; rows identical
    torch.testing.assert_close(_logits(merged), expected, **TOL)


def test_disable_adapter_gives_base_output() -> None:
    base = _model(True)
    expected = _logits(base)
    model = peftkit.get_peft_model(base, _config(peftkit, INDICES, True))
    _perturb(model)
    assert not torch.allclose(_logits(model), expected)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)  # the base kernels on the base weights


def test_second_adapter_with_its_own_rows(tmp_path) -> None:
    model = peftkit.get_peft_model(_model(True), _config(peftkit, INDICES, True))
    model.add_adapter("other", _config(peftkit, [7, 8], True))
    embedding = model.base_model.model.model.embed_tokens
    assert set(embedding.trainable_tokens_delta) == {"default", "other"}
    assert set(model.base_model.model.lm_head.trainable_tokens_delta) == {"default", "other"}
    _perturb(model)
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.model.embed_tokens.trainable_tokens_delta.other" in trainable
    assert not any(n.endswith(".default") or ".default." in n for n in trainable)
    expected = _logits(model)
    model.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(_model(True), str(tmp_path / "other")).eval()
    torch.testing.assert_close(_logits(ref), expected, **TOL)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("value", "error"),
    [([], ConfigError), ([1, -2], ConfigError), ([1, 1], ConfigError), ([1.0, 2], ConfigTypeError),
     (3, ConfigTypeError), ("embed_tokens", ConfigTypeError), ({"embed_tokens": [1.5]}, ConfigTypeError),
     ({"embed_tokens": []}, ConfigError), ({3: [1]}, ConfigTypeError), ({"embed_tokens": 4}, ConfigTypeError)],
)
def test_bad_trainable_token_indices(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="trainable_token_indices"):
        peftkit.LoraConfig(trainable_token_indices=value)


def test_out_of_range_index_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"trainable_token_indices.*out of range: \[128\]"):
        peftkit.get_peft_model(_model(False), _config(peftkit, [1, 128], False))


def test_unknown_module_is_refused() -> None:
    with pytest.raises(NoMatchingPeftModuleError, match="embed_tokenz"):
        peftkit.get_peft_model(_model(False), _config(peftkit, {"embed_tokenz": [1]}, False))


def test_module_also_in_modules_to_save_is_refused() -> None:
    with pytest.raises(ConfigError, match="trainable_token_indices.*modules_to_save"):
        peftkit.get_peft_model(_model(False), _config(peftkit, {"embed_tokens": [1]}, False,
                                                      modules_to_save=["embed_tokens"]))


@pytest.mark.parametrize(("tied", "target"), [(False, "embed_tokens"), (True, "lm_head")], ids=["embed", "tied-head"])
def test_lora_on_a_module_holding_rows_is_refused(tied: bool, target: str) -> None:
    """The embedding as a LoRA target too: the reference raises a TypeError as well. The tied head as a LoRA target:
    the reference nests the tied rows inside the LoRA layer; peftkit refuses (README)."""
    base = _model(tied)
    before = dict(base.named_modules())
    config = peftkit.LoraConfig(target_modules=["q_proj", target], trainable_token_indices=[1])
    with pytest.raises(peftkit.errors.UnsupportedModuleError, match="trainable_token_indices"):
        _quiet(peftkit.get_peft_model, base, config)
    assert dict(base.named_modules()).keys() == before.keys()  # rolled back
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    if not tied:
        with pytest.raises(TypeError, match="trainable_token_indices"):
            _quiet(peft.get_peft_model, _model(tied), peft.LoraConfig(target_modules=["q_proj", target],
                                                                      trainable_token_indices=[1]))


def test_tied_rows_that_differ_with_ensure_weight_tying_are_refused_like_reference() -> None:
    indices = {"embed_tokens": INDICES, "lm_head": [3, 7]}
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        peft.get_peft_model(_model(True), _config(peft, indices, True))
    with pytest.raises(ConfigError, match="ensure_weight_tying"):
        peftkit.get_peft_model(_model(True), _config(peftkit, indices, True))


def test_ensure_weight_tying_on_untied_model_warns() -> None:
    with pytest.warns(peftkit.errors.PeftWarning, match="ensure_weight_tying"):
        peftkit.get_peft_model(_model(False), _config(peftkit, INDICES, True))


def test_mixed_batch_uses_each_rows_adapter() -> None:
    model = peftkit.get_peft_model(_model(True), _config(peftkit, INDICES, True))
    model.add_adapter("other", _config(peftkit, [3, 7], True))
    _perturb(model)
    model.eval()
    ids = torch.cat([_inputs(), _inputs()])
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = _logits(model)
    with model.disable_adapter():
        per_adapter["__base__"] = _logits(model)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        # rows of one batch run the same kernels as a batch of two, but in another grouping
        torch.testing.assert_close(mixed[row], per_adapter[name][row % 2], **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_low_cpu_mem_usage_load(tied: bool, tmp_path) -> None:
    ref = _quiet(peft.get_peft_model, _model(tied), _config(peft, INDICES, tied))
    _perturb(ref)
    ref.save_pretrained(str(tmp_path))
    kit = peftkit.PeftModel.from_pretrained(_model(tied), str(tmp_path), low_cpu_mem_usage=True).eval()
    torch.testing.assert_close(_logits(kit), _logits(ref.eval()), **TOL)


def test_ensure_weight_tying_ties_lora_layers_of_tied_embeddings() -> None:
    """The reference ties LoRA layers of tied embeddings, and so does peftkit (tests/test_lora_tied_targets.py): the
    output head follows the input embedding's LoRA factors instead of being refused or left untied."""
    from peftkit.methods.lora.tied import TiedLinear

    model = peftkit.get_peft_model(_model(True), peftkit.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                                     ensure_weight_tying=True))
    assert isinstance(model.base_model.model.lm_head, TiedLinear)


# ------------------------------------------------------------------------------------------------ modules_to_save


SAVE_CASES = [["embed_tokens"], ["lm_head"], ["model.embed_tokens"]]


def _save_config(lib: object, modules: list[str]) -> object:
    return lib.LoraConfig(target_modules=["q_proj"], modules_to_save=list(modules), ensure_weight_tying=True)


@pytest.mark.parametrize("modules", SAVE_CASES, ids=["embed", "head", "full-name"])
def test_ensure_weight_tying_ties_modules_to_save_copies_like_reference(modules: list[str], tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.errors.PeftWarning)  # tied on purpose: no "one tied module" warning
        kit = peftkit.get_peft_model(_model(True), _save_config(peftkit, modules))
    embedding, head = kit.base_model.model.model.embed_tokens, kit.base_model.model.lm_head
    assert embedding.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    assert embedding.modules_to_save["default"].weight is not embedding.original_module.weight
    _perturb_copies(kit)
    kit.save_pretrained(str(tmp_path / "kit"))
    ref = _quiet(peft.get_peft_model, _model(True), _save_config(peft, modules))
    ref.save_pretrained(str(tmp_path / "ref"))
    assert _keys(str(tmp_path / "kit")) == _keys(str(tmp_path / "ref"))
    # peftkit's file in the reference, and back
    loaded_ref = _quiet(peft.PeftModel.from_pretrained, _model(True), str(tmp_path / "kit")).eval()
    torch.testing.assert_close(_logits(loaded_ref), _logits(kit), **TOL)
    _perturb_copies(ref, seed=2)
    ref.save_pretrained(str(tmp_path / "ref2"))
    loaded_kit = peftkit.PeftModel.from_pretrained(_model(True), str(tmp_path / "ref2")).eval()
    embedding, head = loaded_kit.base_model.model.model.embed_tokens, loaded_kit.base_model.model.lm_head
    assert embedding.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    torch.testing.assert_close(_logits(loaded_kit), _logits(ref.eval()), **TOL)


def _perturb_copies(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            copies = getattr(module, "modules_to_save", None)
            if isinstance(copies, nn.ModuleDict) and "default" in copies:
                weight = copies["default"].weight
                weight.add_(torch.randn(weight.shape, generator=gen) * 0.5)  # tied: the shared weight twice


def test_tied_copies_train_together_and_merge_tied() -> None:
    model = peftkit.get_peft_model(_model(True), _save_config(peftkit, ["embed_tokens"]))
    copy_weight = model.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    base_weight = model.base_model.model.model.embed_tokens.original_module.weight
    before, base_before = copy_weight.detach().clone(), base_weight.detach().clone()
    model.train()
    model(_inputs(), labels=_inputs()).loss.backward()
    assert copy_weight.grad is not None and base_weight.grad is None
    with torch.no_grad():
        copy_weight.sub_(copy_weight.grad)
    assert not torch.equal(copy_weight, before) and torch.equal(base_weight, base_before)
    model.eval()
    expected = _logits(model)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight is copy_weight
    torch.testing.assert_close(_logits(merged), expected, **TOL)


def test_rows_autocast_to_float32_on_bf16_base_like_reference() -> None:
    kit = peftkit.get_peft_model(_model(True).to(torch.bfloat16), _config(peftkit, INDICES, True))
    ref = peft.get_peft_model(_model(True).to(torch.bfloat16), _config(peft, INDICES, True))
    kit_rows = kit.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    ref_rows = ref.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert kit_rows.dtype == ref_rows.dtype
    assert torch.equal(kit_rows, ref_rows)  # both copies of the same bf16 rows
