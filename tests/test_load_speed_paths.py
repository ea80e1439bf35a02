"""Behaviour of the fast injection and loading paths: no wasted random init, meta adapters, storage sharing."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from peftkit import (
    LoraConfig,
    PeftModel,
    ShapeMismatchError,
    get_peft_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from peftkit.injection.apply import skip_random_init, weights_follow
from peftkit.layers.base import AdapterLayer
from peftkit.methods.lora import init as lora_init
from peftkit.methods.lora import layers as lora_layers
from peftkit.serialization.state_dict import walk_modules


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 8)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of LoRA's random inits of linear adapters (every ``init_lora_weights`` mode)."""
    calls: list[int] = []

    def counting(original: object) -> object:
        def init(A: nn.Module, B: nn.Module, r: int) -> None:
            calls.append(r)
            original(A, B, r)  # type: ignore[operator]
        return init

    for mode, original in list(lora_init._LINEAR_INITS.items()):
        monkeypatch.setitem(lora_init._LINEAR_INITS, mode, counting(original))
    return calls


@pytest.fixture
def saved(tmp_path: os.PathLike[str]) -> str:
    model = get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    return str(tmp_path)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_empty_linear_matches_nn_linear() -> None:
    for bias in (True, False):
        fast = lora_layers._empty(nn.Linear, 8, 4, bias=bias, device=torch.device("cpu"), dtype=torch.float64)
        ref = nn.Linear(8, 4, bias=bias, dtype=torch.float64)
        assert type(fast) is nn.Linear and (fast.in_features, fast.out_features) == (8, 4)
        assert {k: (v.shape, v.dtype) for k, v in fast.state_dict().items()} == \
            {k: (v.shape, v.dtype) for k, v in ref.state_dict().items()}
        assert repr(fast) == repr(ref)
        assert all(p.requires_grad for p in fast.parameters())


def test_meta_injection_creates_meta_adapters_without_init(init_calls: list[int]) -> None:
    with torch.device("meta"):
        base = _mlp()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 4 and all(p.is_meta for p in lora)
    assert all(p.requires_grad for p in lora)
    assert init_calls == []
    get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    assert init_calls == [4, 4]  # real weights are initialised once per layer


def test_inference_load_skips_random_init_and_loads_exactly(saved: str, init_calls: list[int]) -> None:
    expected = _adapter_state(PeftModel.from_pretrained(_mlp(), saved, is_trainable=True))
    assert len(init_calls) == 2  # trainable load: missing tensors must still train, so the init runs
    init_calls.clear()
    loaded = PeftModel.from_pretrained(_mlp(), saved)
    assert init_calls == []
    got = _adapter_state(loaded)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    loaded.load_adapter(saved, "second")
    assert init_calls == []
    assert not skip_random_init()


def test_missing_tensor_stays_zero_on_inference_load(saved: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(saved, "adapter_model.safetensors"))
    dropped = [k for k in tensors if "lin0.lora_A" in k]
    assert dropped
    partial = str(tmp_path_factory.mktemp("partial"))
    save_file({k: v for k, v in tensors.items() if k not in dropped}, os.path.join(partial, "adapter_model.safetensors"))
    with open(os.path.join(saved, "adapter_config.json")) as src, \
            open(os.path.join(partial, "adapter_config.json"), "w") as dst:
        dst.write(src.read())
    with pytest.warns(UserWarning, match="[Mm]issing"):
        model = PeftModel.from_pretrained(_mlp(), partial)
    assert torch.count_nonzero(model.base_model.model.lin0.lora_A["default"].weight) == 0
    assert torch.count_nonzero(model.base_model.model.lin1.lora_A["default"].weight) > 0


def test_base_modifying_init_still_runs_on_load(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_peft_model(_mlp(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="pissa"))
    model.save_pretrained(str(tmp_path))
    calls: list[str] = []
    original = lora_layers.init_from_weight

    def counting(*args: object, **kwargs: object) -> object:
        calls.append("pissa")
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_layers, "init_from_weight", counting)
    loaded = PeftModel.from_pretrained(_mlp(), str(tmp_path))
    assert calls == ["pissa"]
    residual = loaded.base_model.model.lin0.get_base_layer().weight
    assert torch.allclose(residual, model.base_model.model.lin0.get_base_layer().weight, atol=1e-6)


def test_loaded_weights_do_not_share_the_file(saved: str) -> None:
    model = PeftModel.from_pretrained(_mlp(), saved)
    before = _adapter_state(model)
    weights = load_peft_weights(saved)
    kept = {k: v.clone() for k, v in weights.items()}
    path = os.path.join(saved, "adapter_model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # overwrite the tensor bytes in place (a memory map would see this)
        f.seek(size - 256)
        f.write(b"\xff" * 256)
    after = _adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(weights[k], kept[k]) for k in kept)  # load_peft_weights never maps the file


def test_inference_load_adopts_the_read_tensors(saved: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaded parameters are the tensors read from the file (no second copy), each with its own storage, and
    still trainable leaves."""
    from safetensors.torch import save_file

    import peftkit.serialization.files as files_module

    read: dict[str, torch.Tensor] = {}
    real = files_module._load_weights

    def capture(*args: object, **kwargs: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, metadata = real(*args, **kwargs)  # type: ignore[arg-type]
        read.update(tensors)
        return tensors, metadata

    monkeypatch.setattr(files_module, "_load_weights", capture)
    model = PeftModel.from_pretrained(_mlp(), saved, is_trainable=True)
    weight = model.base_model.model.lin0.lora_A["default"].weight
    assert weight.data_ptr() == read["base_model.model.lin0.lora_A.weight"].data_ptr()
    assert isinstance(weight, nn.Parameter) and weight.requires_grad and weight.is_leaf
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len({v.untyped_storage().data_ptr() for v in lora.values()}) == len(lora) == 4
    save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(saved, "resaved.safetensors"))
    (model(torch.randn(2, 8)).sum()).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("damage", ["truncate", "header", "overlap"])
def test_whole_file_reader_rejects_damaged_files(saved: str, damage: str, tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    import json
    import struct

    from peftkit.errors import AdapterLoadError

    path = os.path.join(saved, "adapter_model.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "header":
        raw = raw[:8] + b"x" + raw[9:]
    else:
        keys = [k for k in header if k != "__metadata__"]
        header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]
        text = json.dumps(header).encode()
        text += b" " * (n - len(text))
        raw = raw[:8] + text[:n] + raw[8 + n:] if len(text) == n else raw[:-10]
    bad = tmp_path_factory.mktemp("damaged")
    with open(os.path.join(bad, "adapter_model.safetensors"), "wb") as f:
        f.write(raw)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        load_peft_weights(str(bad))


def test_assign_shares_owned_tensors_only_when_safe() -> None:
    model = get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    layer = model.base_model.model.lin0
    param = layer.lora_A["default"].weight
    owned = torch.randn(4, 8)
    set_peft_model_state_dict(model, {"base_model.model.lin0.lora_A.weight": owned}, assign=True)
    assert layer.lora_A["default"].weight is param and param.data_ptr() == owned.data_ptr()
    assert param.requires_grad
    other_dtype = torch.randn(4, 8, dtype=torch.float64)
    set_peft_model_state_dict(model, {"base_model.model.lin0.lora_A.weight": other_dtype}, assign=True)
    assert param.dtype == torch.float32 and param.data_ptr() != other_dtype.data_ptr()
    assert torch.equal(param, other_dtype.float())
    strided = torch.randn(8, 4).t()  # (4, 8) but not contiguous: copied, the parameter keeps its layout
    set_peft_model_state_dict(model, {"base_model.model.lin0.lora_A.weight": strided}, assign=True)
    assert param.data_ptr() != strided.data_ptr() and torch.equal(param, strided) and param.is_contiguous()
    plain = torch.randn(4, 8)
    set_peft_model_state_dict(model, {"base_model.model.lin0.lora_A.weight": plain})
    assert param.data_ptr() != plain.data_ptr() and torch.equal(param, plain)


def test_failed_inference_load_leaves_model_unchanged(saved: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(saved, "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    bad = str(tmp_path_factory.mktemp("bad"))
    save_file(tensors, os.path.join(bad, "adapter_model.safetensors"))
    with open(os.path.join(saved, "adapter_config.json")) as src, open(os.path.join(bad, "adapter_config.json"), "w") as dst:
        dst.write(src.read())
    base = _mlp()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ShapeMismatchError):
        PeftModel.from_pretrained(base, bad)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert base.state_dict().keys() == reference.keys()
    assert all(torch.equal(base.state_dict()[k], reference[k]) for k in reference)
    assert not skip_random_init()


def test_weights_follow_is_scoped() -> None:
    assert not skip_random_init()
    with pytest.raises(RuntimeError), weights_follow():
        assert skip_random_init()
        raise RuntimeError
    assert not skip_random_init()


def test_walk_modules_is_named_modules_with_pruning() -> None:
    model = nn.Sequential(_mlp(), nn.Sequential(nn.ReLU()))
    model.shared = model[0].lin0  # a module reachable twice is visited once, as named_modules does
    assert [(n, id(m)) for n, m in walk_modules(model, ())] == [(n, id(m)) for n, m in model.named_modules()]
    pruned = [n for n, _ in walk_modules(model, (MLP,))]
    assert pruned == ["", "0", "1", "1.0", "shared"]  # lin0 was not reached inside the pruned MLP
