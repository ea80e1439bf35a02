"""Where adapter files go and how they are written: adapter names and ``subfolder`` cannot leave the directory
named, saving one weights format removes the other's stale file, written files honour the umask."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from models import MLP

from peftkit import (
    ConfigError,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
)
from peftkit.serialization.files import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights

BAD_NAMES = ["", ".", "..", "a/b", "../x", "a\\b", "x\x00y", "C:x"]


def _config(**kwargs: object) -> LoraConfig:
    return LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False, **kwargs)


def _bad_names(tmp_path) -> list[str]:
    return [*BAD_NAMES, str(tmp_path / "abs")]


def _assert_names_adapter_name(exc: pytest.ExceptionInfo[ConfigError], name: str) -> None:
    assert exc.value.field == "adapter_name" and exc.value.value == name
    assert isinstance(exc.value, ValueError)


def test_add_adapter_refuses_path_like_names(tmp_path) -> None:
    model = get_peft_model(MLP(), _config())
    for name in _bad_names(tmp_path):
        with pytest.raises(ConfigError) as exc:
            model.add_adapter(name, _config())
        _assert_names_adapter_name(exc, name)
    assert list(model.peft_config) == ["default"]
    assert not (tmp_path / "abs").exists()


def test_absolute_name_cannot_make_save_write_outside(tmp_path) -> None:
    outside = tmp_path / "outside"
    model = get_peft_model(MLP(), _config())
    with pytest.raises(ConfigError):
        model.add_adapter(str(outside), _config())
    model.save_pretrained(tmp_path / "out")
    assert not outside.exists()


@pytest.mark.parametrize("name", ["..", "a/b", "/abs"])
def test_get_peft_model_and_inject_refuse_path_like_names(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        get_peft_model(MLP(), _config(), adapter_name=name)
    _assert_names_adapter_name(exc, name)
    model = MLP()
    with pytest.raises(ConfigError):
        inject_adapter_in_model(_config(), model, adapter_name=name)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_load_and_from_pretrained_refuse_path_like_names(tmp_path) -> None:
    get_peft_model(MLP(), _config()).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(MLP(), tmp_path)
    with pytest.raises(ConfigError) as exc:
        model.load_adapter(tmp_path, adapter_name="../up")
    _assert_names_adapter_name(exc, "../up")
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ConfigError):
        PeftModel.from_pretrained(MLP(), tmp_path, adapter_name="x/y")


def test_add_weighted_adapter_refuses_path_like_name() -> None:
    model = get_peft_model(MLP(), _config())
    with pytest.raises(ConfigError) as exc:
        model.add_weighted_adapter(["default"], [1.0], "../combined", combination_type="linear")
    _assert_names_adapter_name(exc, "../combined")
    assert list(model.peft_config) == ["default"]


def test_ordinary_names_still_work(tmp_path) -> None:
    model = get_peft_model(MLP(), _config())
    for name in ["task-1", "my adapter", "a_b", "tâche:1"]:
        model.add_adapter(name, _config())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "my adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("subfolder", ["../x", "a/../../x", "..", "/abs", "a\\..\\..\\x", "x\x00"])
def test_subfolder_cannot_escape(tmp_path, subfolder: str) -> None:
    inner = tmp_path / "inner"
    get_peft_model(MLP(), _config()).save_pretrained(tmp_path / "x")  # what an escaping subfolder would reach
    inner.mkdir()
    if subfolder == "/abs":
        subfolder = str(tmp_path / "x")
    for load in (
        lambda: PeftConfig.from_pretrained(inner, subfolder=subfolder),
        lambda: load_peft_weights(inner, subfolder=subfolder),
        lambda: PeftModel.from_pretrained(MLP(), inner, subfolder=subfolder),
    ):
        with pytest.raises(ConfigError) as exc:
            load()
        assert exc.value.field == "subfolder" and exc.value.value == subfolder
    model = get_peft_model(MLP(), _config())
    with pytest.raises(ConfigError):
        model.load_adapter(inner, adapter_name="other", subfolder=subfolder)


def test_inner_subfolder_still_loads(tmp_path) -> None:
    get_peft_model(MLP(), _config()).save_pretrained(tmp_path / "a" / "b")
    model = PeftModel.from_pretrained(MLP(), tmp_path, subfolder="a/b")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("first_safe", [True, False])
def test_saving_one_format_removes_the_others_stale_file(tmp_path, first_safe: bool) -> None:
    old = get_peft_model(MLP(), _config(), adapter_name="default")
    old.add_adapter("other", _config())
    old.save_pretrained(tmp_path, safe_serialization=first_safe)
    torch.manual_seed(1)
    new = get_peft_model(MLP(), _config())
    new.add_adapter("other", _config())
    new.save_pretrained(tmp_path, safe_serialization=not first_safe)
    stale, fresh = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if first_safe else (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)
    for where in (tmp_path, tmp_path / "other"):
        assert not (where / stale).exists() and (where / fresh).is_file()
    loaded = load_peft_weights(tmp_path)
    expected = new.get_base_model().lin0.lora_A["default"].weight
    key = next(k for k in loaded if "lora_A" in k)
    assert torch.equal(loaded[key], expected.detach())  # the same bytes written and read back


def test_other_files_in_directory_are_kept(tmp_path) -> None:
    (tmp_path / "adapter_model.safetensors.bak").write_text("keep")
    (tmp_path / "notes.txt").write_text("keep")
    get_peft_model(MLP(), _config()).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.safetensors.bak").read_text() == "keep"
    assert (tmp_path / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("safe", [True, False])
def test_written_files_honour_the_umask(tmp_path, umask: int, safe: bool) -> None:
    model = get_peft_model(MLP(), _config())
    model.add_adapter("other", _config())
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path, safe_serialization=safe)
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"adapter_config.json", "README.md", SAFETENSORS_WEIGHTS_NAME if safe else WEIGHTS_NAME} <= names
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left behind
