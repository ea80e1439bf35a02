"""``LoraConfig(layer_replication=...)`` (issue 18, item 2): a deeper model built from repeated ranges of decoder
layers that share the base weights, each copy with its own LoRA adapter.

Semantics and file format follow the reference (🤗 PEFT 0.21.2 ``tuners_utils.replicate_layers``, called by
``LoraModel._prepare_model``): ``[[0, 2], [1, 2]]`` on a 2-layer Llama gives layers ``[0, 1, 1]``; the copies share
every base parameter, ``layer_idx`` of the copies' attention modules and ``config.num_hidden_layers`` follow the new
positions, and adapter keys use the new layer indices (``model.layers.2.self_attn.q_proj.lora_A.weight``).
Deliberate differences (README): merging refuses (the reference merges every copy's update into the one shared
weight), and a failed injection or load puts the original layers back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, MergeError, NoMatchingPeftModuleError
from tests.models import tiny_llama
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")

MAP = [[0, 2], [1, 2]]  # 2 layers -> [0, 1, 1]
WEIGHTS = "adapter_model.safetensors"
#: three decoder layers instead of two, each adding a rank-4 update: the longest reduction grows by half
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION * 3 // 2)


def _inputs() -> torch.Tensor:
    return torch.tensor([[1, 3, 7, 5, 60, 9], [60, 2, 3, 4, 5, 6]])


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs()).logits


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a tiny Llama, bare or inside a PeftModel of either library."""
    while hasattr(model, "model") and not isinstance(getattr(model, "layers", None), nn.ModuleList):
        model = model.model
    return model.layers


def _config(lib: object, layer_map: object = MAP, **kwargs: object) -> object:
    kwargs = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs}
    return lib.LoraConfig(layer_replication=layer_map, **kwargs)


def _perturb(model: nn.Module, seed: int = 2) -> None:
    """Move every LoRA tensor away from its init, differently in every layer copy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def _build(lib: object, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(tiny_llama().eval(), _config(lib, **kwargs))
    _perturb(model)
    return model.eval()


def _snapshot(model: nn.Module) -> tuple[list[int], int, list[int], dict[str, torch.Tensor]]:
    """What a failed injection or load must leave unchanged: the layer objects, the layer count in the config, the
    attention ``layer_idx``es and every parameter and buffer (names and values)."""
    layers = _layers(model)
    return ([id(layer) for layer in layers], model.config.num_hidden_layers,
            [layer.self_attn.layer_idx for layer in layers],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model: nn.Module, before: tuple[list[int], int, list[int], dict[str, torch.Tensor]]) -> None:
    ids, count, idx, state = _snapshot(model)
    assert (ids, count, idx) == before[:3]
    assert sorted(state) == sorted(before[3])
    for key, value in state.items():
        assert torch.equal(value, before[3][key]), key


# ------------------------------------------------------------------------------------------------ structure


def test_replicated_layers_share_base_weights_and_have_own_adapters() -> None:
    base = tiny_llama()
    originals = list(_layers(base))
    model = peftkit.get_peft_model(base, _config(peftkit))
    layers = _layers(model)
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert all(layer is not original for layer in layers for original in originals)  # clones, as the reference
    for copy, source in ((layers[0], originals[0]), (layers[1], originals[1]), (layers[2], originals[1])):
        shared = dict(source.named_parameters())
        for name, param in copy.named_parameters():
            if "lora_" not in name:
                assert param is shared[name.replace(".base_layer", "")], name
    own = [layer.self_attn.q_proj.lora_A["default"].weight for layer in layers]
    assert len({id(p) for p in own}) == 3
    assert not torch.equal(own[1], own[2])  # each copy initialised its own adapter


def test_same_checkpoint_keys_and_shapes_as_reference() -> None:
    ours = peftkit.get_peft_model_state_dict(_build(peftkit))
    ref = peft.get_peft_model_state_dict(_build(peft))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert any(".layers.2.self_attn.q_proj.lora_A" in k for k in ours)


def test_stored_config_keeps_layer_replication() -> None:
    model = _build(peftkit)
    assert model.peft_config["default"].layer_replication == MAP


@pytest.mark.parametrize("saver", ["peftkit", "peft"])
def test_interop_both_ways(saver: str, tmp_path: Path) -> None:
    save_lib, load_lib = (peftkit, peft) if saver == "peftkit" else (peft, peftkit)
    model = _build(save_lib)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert any(".layers.2." in k for k in load_file(tmp_path / WEIGHTS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_lib.PeftModel.from_pretrained(tiny_llama().eval(), tmp_path).eval()
    assert len(_layers(loaded)) == 3 and loaded.config.num_hidden_layers == 3
    saved = save_lib.get_peft_model_state_dict(model)
    reloaded = load_lib.get_peft_model_state_dict(loaded)
    assert sorted(saved) == sorted(reloaded)
    for key, value in saved.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded), expected, **TOL)


def test_generate_matches_reference() -> None:
    """A cache sized by the new ``num_hidden_layers`` and indexed by the copies' ``layer_idx``: greedy decoding of
    the same adapter weights gives the same tokens in both libraries."""
    ours, ref = _build(peftkit), _build(peft)
    peft.set_peft_model_state_dict(ref, peftkit.get_peft_model_state_dict(ours))  # identical adapter weights
    torch.testing.assert_close(_logits(ours), _logits(ref), **TOL)
    ids = torch.tensor([[1, 3, 7, 5]])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(input_ids=ids, **kwargs), ref.generate(input_ids=ids, **kwargs))


# ------------------------------------------------------------------------------------------------ training


def test_training_gives_each_copy_its_own_adapter() -> None:
    model = _build(peftkit).train()
    layers = _layers(model)
    shared = layers[1].self_attn.q_proj.base_layer.weight
    before_base = shared.detach().clone()
    before = [layer.self_attn.q_proj.lora_B["default"].weight.detach().clone() for layer in layers]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=_inputs(), labels=_inputs()).loss.backward()
    grads = [layer.self_attn.q_proj.lora_B["default"].weight.grad for layer in layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(grads[1], grads[2])  # the two copies of layer 1 see different inputs
    opt.step()
    after = [layer.self_attn.q_proj.lora_B["default"].weight for layer in layers]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    assert not torch.equal(after[1] - before[1], after[2] - before[2])
    assert shared.grad is None and torch.equal(shared, before_base)  # the shared base stays frozen


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("value", [[[0]], "x", [[1, 0]], [[1, 1]], [[-1, 1]], [[0, 1.5]], [[0, True]], [0, 1],
                                   {"a": 1}, [[0, 1, 2]]])
def test_bad_value_raises_naming_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match="layer_replication") as info:
        peftkit.LoraConfig(target_modules=["q_proj"], layer_replication=value)
    assert info.value.field == "layer_replication"


def test_empty_list_means_no_replication() -> None:
    """As the reference (``if peft_config.layer_replication:``): ``[]`` replicates nothing."""
    model = peftkit.get_peft_model(tiny_llama(), _config(peftkit, layer_map=[]))
    assert len(_layers(model)) == 2


def test_range_past_the_last_layer_raises_and_changes_nothing() -> None:
    """The reference raises ``IndexError`` from the ``ModuleList``; peftkit's error is also an ``IndexError``."""
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ConfigError, match="layer_replication") as info:
        peftkit.get_peft_model(base, _config(peftkit, layer_map=[[0, 2], [1, 3]]))
    assert isinstance(info.value, IndexError) and "2 layers" in str(info.value)
    _assert_unchanged(base, before)


def test_model_without_layer_list_raises() -> None:
    base = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="layer_replication"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(target_modules=["0"], layer_replication=[[0, 1]]))
    assert isinstance(base[0], nn.Linear)


def test_failed_injection_leaves_model_unchanged() -> None:
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(NoMatchingPeftModuleError):
        peftkit.get_peft_model(base, _config(peftkit, target_modules=["no_such_module"]))
    _assert_unchanged(base, before)


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("is_trainable", [False, True], ids=["inference", "trainable"])
def test_from_pretrained_replicates_once(is_trainable: bool, tmp_path: Path) -> None:
    """A trainable load first injects a throw-away probe on the meta device: the model must end up replicated once."""
    model = _build(peftkit)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama().eval(), tmp_path, is_trainable=is_trainable).eval()
    layers = _layers(loaded)
    assert len(layers) == 3 and loaded.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    torch.testing.assert_close(_logits(loaded), _logits(model), **TOL)


def test_auto_peft_model_replicates_once(tmp_path: Path) -> None:
    import transformers

    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peftkit.get_peft_model(base, _config(peftkit))
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert len(_layers(loaded)) == 3 and loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(loaded), _logits(model.eval()), **TOL)


@pytest.mark.parametrize("is_trainable", [False, True], ids=["inference", "trainable"])
def test_failed_load_leaves_model_unchanged(is_trainable: bool, tmp_path: Path) -> None:
    _build(peftkit).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = next(k for k in tensors if ".layers.2.self_attn.q_proj.lora_A" in k)
    tensors[key] = torch.zeros(5, 32)  # wrong rank: the load must fail
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    base = tiny_llama().eval()
    before = _snapshot(base)
    with pytest.raises(ValueError):
        peftkit.PeftModel.from_pretrained(base, tmp_path, is_trainable=is_trainable)
    _assert_unchanged(base, before)


def test_second_adapter_with_same_map_does_not_replicate_again(tmp_path: Path) -> None:
    model = _build(peftkit)
    model.save_pretrained(tmp_path)
    layers = list(_layers(model))
    model.add_adapter("other", _config(peftkit))
    model.load_adapter(tmp_path, "loaded", is_trainable=True)
    assert list(_layers(model)) == layers and model.config.num_hidden_layers == 3
    assert set(layers[2].self_attn.q_proj.lora_A) == {"default", "other", "loaded"}


def test_second_adapter_with_other_map_is_refused() -> None:
    model = _build(peftkit)
    layers = list(_layers(model))
    with pytest.raises(ConfigError, match="layer_replication"):
        model.add_adapter("other", _config(peftkit, layer_map=[[0, 2], [0, 2]]))
    assert list(_layers(model)) == layers and "other" not in model.peft_config


def test_failed_load_adapter_keeps_first_adapters_replication(tmp_path: Path) -> None:
    """A second adapter that finds the model already replicated must not undo the replication when it fails."""
    model = _build(peftkit)
    layers = list(_layers(model))
    with pytest.raises(NoMatchingPeftModuleError):
        model.add_adapter("other", _config(peftkit, target_modules=["no_such_module"]))
    assert list(_layers(model)) == layers and model.config.num_hidden_layers == 3


# ------------------------------------------------------------------------------------------------ merge / unload


def test_merge_is_refused_and_changes_nothing() -> None:
    """The copies share their base weights, so merging would add every copy's update into the same tensor (the
    reference intends to refuse but its check never fires)."""
    model = _build(peftkit)
    expected = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match="layer_replication"):
        model.merge_adapter()
    with pytest.raises(MergeError, match="layer_replication"):
        model.merge_and_unload()
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


def test_unload_keeps_the_replicated_layers() -> None:
    """As the reference: ``unload`` removes the adapters, the deeper model (sharing weights) stays."""
    model = _build(peftkit)
    plain = model.unload()
    layers = _layers(plain)
    assert len(layers) == 3 and plain.config.num_hidden_layers == 3
    assert type(layers[2].self_attn.q_proj) is nn.Linear
    assert layers[2].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight


def test_transformers_integration_load_adapter(tmp_path: Path) -> None:
    """transformers' ``model.load_adapter`` path (peftkit's integration): replicates once; a failed load restores."""
    from peftkit.integrations.transformers_model import load_adapter

    model = _build(peftkit)
    model.save_pretrained(tmp_path / "good")
    plain = tiny_llama().eval()
    load_adapter(plain, str(tmp_path / "good"))
    assert len(_layers(plain)) == 3 and plain.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(plain), _logits(model), **TOL)

    tensors = load_file(tmp_path / "good" / WEIGHTS)
    key = next(k for k in tensors if ".layers.2.self_attn.q_proj.lora_A" in k)
    tensors[key] = torch.zeros(5, 32)
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / WEIGHTS, metadata={"format": "pt"})
    (tmp_path / "bad" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    fresh = tiny_llama().eval()
    before = _snapshot(fresh)
    with pytest.raises(ValueError):
        load_adapter(fresh, str(tmp_path / "bad"))
    _assert_unchanged(fresh, before)


def test_replicated_model_pickles_and_deep_copies() -> None:
    """The undo a tuner keeps is picklable; a copy keeps the copies' weights shared (stored once)."""
    import copy
    import io

    model = _build(peftkit)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        layers = _layers(clone)
        assert layers[2].self_attn.q_proj.base_layer.weight is layers[1].self_attn.q_proj.base_layer.weight
        torch.testing.assert_close(_logits(clone), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("saver", ["peftkit", "peft"])
def test_bert_encoder_layers_interop(saver: str, tmp_path: Path) -> None:
    """BERT-like models: the list at ``.bert.encoder.layer`` is replicated, as the reference does."""
    from tests.models import tiny_bert

    def base() -> nn.Module:
        return tiny_bert("TOKEN_CLS").eval()

    def out(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=_inputs()).logits

    save_lib, load_lib = (peftkit, peft) if saver == "peftkit" else (peft, peftkit)
    config = save_lib.LoraConfig(target_modules=["query", "value"], r=4, lora_alpha=8, init_lora_weights=False,
                                 layer_replication=[[0, 2], [0, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = save_lib.get_peft_model(base(), config)
        _perturb(model)
        model.eval()
        model.save_pretrained(tmp_path)
        loaded = load_lib.PeftModel.from_pretrained(base(), tmp_path).eval()
    for m in (model, loaded):
        layers = m.base_model.model.bert.encoder.layer
        assert len(layers) == 3 and m.config.num_hidden_layers == 3
        assert layers[2].attention.self.query.base_layer.weight is layers[0].attention.self.query.base_layer.weight
    torch.testing.assert_close(out(loaded), out(model), **TOL)
