"""TrainableTokens (``TrainableTokensConfig``): only chosen embedding rows train; files interoperate with the
reference both ways, with untied and tied input/output embeddings."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, ConfigTypeError
from peftkit.methods.trainable_tokens import TrainableTokensLayer
from tests.models import tiny_llama
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")

INDICES = [3, 5, 60]
#: both libraries compute the same forward (rows replaced, then the same transformer) with their own code paths
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


def _model(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


def _inputs() -> torch.Tensor:
    return torch.tensor([[1, 3, 7, 5, 60, 9], [60, 2, 3, 4, 5, 6]])


def _perturb(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs()).logits


def _keys(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_only_chosen_rows_train(tied: bool) -> None:
    model = peftkit.get_peft_model(_model(tied), peftkit.TrainableTokensConfig(token_indices=INDICES))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.model.embed_tokens.trainable_tokens_delta.default"]
    base_weight = model.base_model.model.model.embed_tokens.get_base_layer().weight
    model.train()
    model(_inputs(), labels=_inputs()).loss.backward()
    delta = model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.grad.shape == (len(INDICES), 32)
    assert base_weight.grad is None
    assert isinstance(model.base_model.model.lm_head, TrainableTokensLayer) == tied


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_identity_at_init_and_rows_replaced(tied: bool) -> None:
    base = _model(tied)
    expected = _logits(base)
    model = peftkit.get_peft_model(base, peftkit.TrainableTokensConfig(token_indices=INDICES))
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)  # same rows, same kernels
    _perturb(model)
    layer = model.base_model.model.model.embed_tokens
    emb = layer(torch.tensor(INDICES))
    torch.testing.assert_close(emb, layer.trainable_tokens_delta["default"].detach(), atol=0, rtol=0)
    other = layer(torch.tensor([4]))
    torch.testing.assert_close(other, layer.get_base_layer().weight[4:5].detach(), atol=0, rtol=0)
    if tied:  # the tied head scores the new rows too
        hidden = torch.randn(2, 32)
        head = model.base_model.model.lm_head
        torch.testing.assert_close(head(hidden)[:, INDICES], hidden @ layer.trainable_tokens_delta["default"].T,
                                   **TOL)


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peftkit_file_loads_in_reference(tied: bool, tmp_path) -> None:
    model = peftkit.get_peft_model(_model(tied), peftkit.TrainableTokensConfig(token_indices=INDICES))
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    keys = set(_keys(str(tmp_path)))
    expected = {"base_model.model.model.embed_tokens.trainable_tokens_delta"}
    if tied:  # the reference writes the shared rows under the tied head's name too
        expected.add("base_model.model.lm_head.trainable_tokens_delta")
    assert keys == expected
    ref = peft.PeftModel.from_pretrained(_model(tied), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(ref), _logits(model), **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_reference_file_loads_in_peftkit(tied: bool, tmp_path) -> None:
    ref = peft.get_peft_model(_model(tied), peft.TrainableTokensConfig(token_indices=INDICES))
    _perturb(ref)
    ref.save_pretrained(str(tmp_path))
    model = peftkit.PeftModel.from_pretrained(_model(tied), str(tmp_path)).eval()
    assert model.peft_config["default"].target_modules == "model.embed_tokens"
    torch.testing.assert_close(_logits(model), _logits(ref.eval()), **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_load_exact_and_config_matches_reference(tied: bool, tmp_path) -> None:
    model = peftkit.get_peft_model(_model(tied), peftkit.TrainableTokensConfig(token_indices=INDICES))
    _perturb(model)
    model.save_pretrained(str(tmp_path / "kit"))
    ref = peft.get_peft_model(_model(tied), peft.TrainableTokensConfig(token_indices=INDICES))
    ref.save_pretrained(str(tmp_path / "ref"))
    import json

    kit_cfg = json.loads((tmp_path / "kit" / "adapter_config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    for field in ("peft_type", "target_modules", "token_indices", "init_weights"):
        assert kit_cfg[field] == ref_cfg[field], field
    loaded = peftkit.PeftModel.from_pretrained(_model(tied), str(tmp_path / "kit")).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)  # same tensors, same kernels


# ------------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merge_and_unload_writes_rows(tied: bool) -> None:
    model = peftkit.get_peft_model(_model(tied), peftkit.TrainableTokensConfig(token_indices=INDICES))
    _perturb(model)
    rows = model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].detach().clone()
    expected = _logits(model)
    merged = model.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding and type(merged.lm_head) is nn.Linear
    assert torch.equal(merged.model.embed_tokens.weight[INDICES], rows)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    torch.testing.assert_close(_logits(merged), expected, **TOL)


def test_unmerge_restores_rows() -> None:
    base = _model(False)
    original = base.model.embed_tokens.weight.detach().clone()
    model = peftkit.get_peft_model(base, peftkit.TrainableTokensConfig(token_indices=INDICES))
    _perturb(model)
    model.merge_adapter()
    assert not torch.equal(base.model.embed_tokens.weight, original)
    model.unmerge_adapter()
    assert torch.equal(base.model.embed_tokens.weight, original)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("indices", "error"),
    [([], ConfigError), ([1, -2], ConfigError), ([1, 1], ConfigError), ([1.0, 2], ConfigTypeError),
     (["a"], ConfigTypeError), ([True], ConfigTypeError), (3, ConfigTypeError)],
)
def test_bad_token_indices(indices: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="token_indices"):
        peftkit.TrainableTokensConfig(token_indices=indices)


def test_out_of_range_index_names_field() -> None:
    with pytest.raises(ConfigError, match=r"token_indices.*out of range: \[128\]"):
        peftkit.get_peft_model(_model(False), peftkit.TrainableTokensConfig(token_indices=[1, 128]))


def test_non_embedding_target_is_refused() -> None:
    with pytest.raises(peftkit.errors.UnsupportedModuleError, match="q_proj"):
        peftkit.get_peft_model(_model(False), peftkit.TrainableTokensConfig(token_indices=[1], target_modules=["q_proj"]))


def test_tied_model_does_not_warn_about_tying() -> None:
    """The method adapts both tied modules, so the generic "adapter applies to one tied module" warning is wrong."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.errors.PeftWarning)
        peftkit.get_peft_model(_model(True), peftkit.TrainableTokensConfig(token_indices=INDICES))


def test_second_adapter_shares_tied_head_and_disjoint_rows_required() -> None:
    model = peftkit.get_peft_model(_model(True), peftkit.TrainableTokensConfig(token_indices=INDICES))
    model.add_adapter("other", peftkit.TrainableTokensConfig(token_indices=[7, 8]))
    head = model.base_model.model.lm_head
    assert isinstance(head, TrainableTokensLayer) and not isinstance(head.base_layer, TrainableTokensLayer)
    assert set(head.trainable_tokens_delta) == {"default", "other"}
    model.add_adapter("clash", peftkit.TrainableTokensConfig(token_indices=[5]))
    model.base_model.set_adapter(["default", "clash"])
    with pytest.raises(peftkit.errors.AdapterConflictError, match="overlap"):
        model(_inputs())


def test_rows_autocast_to_float32_on_bf16_base_like_reference() -> None:
    kit = peftkit.get_peft_model(_model(False).to(torch.bfloat16), peftkit.TrainableTokensConfig(token_indices=INDICES))
    ref = peft.get_peft_model(_model(False).to(torch.bfloat16), peft.TrainableTokensConfig(token_indices=INDICES))
    kit_rows = kit.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    ref_rows = ref.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    assert kit_rows.dtype == ref_rows.dtype == torch.float32
    assert torch.equal(kit_rows, ref_rows)


def test_resized_tied_vocab_saves_rows_alone_and_reloads_exactly(tmp_path) -> None:
    """docs/trainable_tokens.md: with tied embeddings and every added token trained, ``save_embedding_layers=False``
    saves the rows alone, and a base resized again (other random rows) gives the same outputs after loading."""
    base = _model(tied=True)
    old_vocab = base.get_input_embeddings().weight.shape[0]
    base.resize_token_embeddings(old_vocab + 2)
    new_ids = [old_vocab, old_vocab + 1]
    model = peftkit.get_peft_model(base, peftkit.TrainableTokensConfig(token_indices=new_ids))
    _perturb(model)
    ids = torch.tensor([[1, old_vocab, 7, old_vocab + 1, 4]])
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(str(tmp_path), save_embedding_layers=False)
    # the rows only (the tied head's key holds the same rows, as the reference writes it); no embedding matrix
    assert set(_keys(str(tmp_path))) == {"base_model.model.model.embed_tokens.trainable_tokens_delta",
                                         "base_model.model.lm_head.trainable_tokens_delta"}

    torch.manual_seed(123)  # the new rows of this resize differ from the first one's
    fresh = _model(tied=True)
    fresh.resize_token_embeddings(old_vocab + 2)
    loaded = peftkit.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)  # same rows, same kernels
