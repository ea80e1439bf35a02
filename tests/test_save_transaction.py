"""Directory transactions of saves (``peftkit.transaction``) and the config/weights pairing check of loads (issue 16,
item 3). The crash and concurrency cases are in ``test_crash_safety.py``; these are the rules around them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest
import torch
from models import MLP
from safetensors.torch import load_file, save_file

from peftkit import (
    AdapterLoadError,
    AdapterMismatchError,
    ConfigError,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit import transaction as tx


def _model(seed: int = 1, **overrides: object) -> PeftModel:
    torch.manual_seed(seed)
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["lin0"], "init_lora_weights": False, **overrides}
    return get_peft_model(MLP(), LoraConfig(**config))


def _edit_config(directory: object, **changes: object) -> None:
    path = os.path.join(directory, "adapter_config.json")  # type: ignore[arg-type]
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    data.update(changes)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _load(directory: object, **kwargs: object) -> PeftModel:
    torch.manual_seed(0)
    return PeftModel.from_pretrained(MLP(), directory, **kwargs)


# ------------------------------------------------------------------------------------------- the pairing check
@pytest.mark.parametrize("field,value", [("lora_alpha", 64), ("r", 3), ("target_modules", ["lin1"]),
                                         ("use_rslora", True), ("peft_type", "LOHA")])
def test_config_edited_after_the_save_is_a_mismatch(tmp_path, field, value):
    _model().save_pretrained(tmp_path)
    _edit_config(tmp_path, **{field: value})
    with pytest.raises(AdapterMismatchError, match=f"{field}: .* in adapter_config.json but .* with the weights"):
        _load(tmp_path)
    model = _model(seed=3)
    with pytest.raises(AdapterMismatchError):
        model.load_adapter(tmp_path, "other")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("field,value", [("base_model_name_or_path", "/elsewhere/base"), ("revision", "v2"),
                                         ("inference_mode", False), ("peft_version", "0.1.0")])
def test_descriptive_fields_may_be_edited(tmp_path, field, value):
    saved = _model()
    saved.save_pretrained(tmp_path)
    _edit_config(tmp_path, **{field: value})
    loaded = _load(tmp_path)
    expected = get_peft_model_state_dict(saved)
    got = get_peft_model_state_dict(loaded)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)  # same file bytes


def test_an_explicit_config_skips_the_pairing_check(tmp_path):
    _model().save_pretrained(tmp_path)
    _edit_config(tmp_path, lora_alpha=64)
    loaded = _load(tmp_path, config=PeftConfig.from_pretrained(tmp_path))  # the user chooses the edited config
    assert loaded.peft_config["default"].lora_alpha == 64


def test_weights_without_the_saved_config_are_not_checked(tmp_path):
    """``.bin`` files and files of other writers (the reference) carry no config: the config file is used."""
    _model().save_pretrained(tmp_path)
    weights = str(tmp_path / "adapter_model.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    _edit_config(tmp_path, lora_alpha=64)
    assert _load(tmp_path).peft_config["default"].lora_alpha == 64
    other = tmp_path / "bin"
    _model().save_pretrained(other, safe_serialization=False)
    _edit_config(other, lora_alpha=32)
    assert _load(other).peft_config["default"].lora_alpha == 32


def test_unreadable_saved_config_is_a_typed_error(tmp_path):
    _model().save_pretrained(tmp_path)
    weights = str(tmp_path / "adapter_model.safetensors")
    for bad in ("{not json", "[1, 2]", "[" * 100 + "]" * 100):
        save_file(load_file(weights), weights, metadata={"format": "pt", "peftkit_adapter_config": bad})
        with pytest.raises(AdapterMismatchError, match="unreadable"):
            _load(tmp_path)


def test_reference_loads_peftkit_files_with_the_extra_metadata(tmp_path):
    import peft

    saved = _model()
    saved.save_pretrained(tmp_path)
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(MLP(), str(tmp_path))
    ours = get_peft_model_state_dict(saved)
    got = peft.get_peft_model_state_dict(theirs)
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in got)


# ------------------------------------------------------------------------------------------- the transaction
def test_a_save_leaves_only_the_adapter_files_and_keeps_other_files(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    _model().save_pretrained(tmp_path)
    _model(seed=2).save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.bin",
                                            "trainer_state.json"]


def test_a_save_that_fails_while_writing_changes_nothing(tmp_path, monkeypatch):
    _model().save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _model(seed=2, lora_alpha=16).save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_abandoned_staging_directories_are_removed_by_the_next_save(tmp_path):
    _model().save_pretrained(tmp_path)
    abandoned = tmp_path / ".peftkit-save-0123456789abcdef"
    abandoned.mkdir()
    (abandoned / "adapter_model.safetensors").write_bytes(b"partial")
    unrelated = tmp_path / ".peftkit-save-mine"  # not a name a save creates: left alone
    unrelated.mkdir()
    assert _load(tmp_path) is not None and abandoned.exists()  # loads ignore it
    _model(seed=2).save_pretrained(tmp_path)
    assert not abandoned.exists() and unrelated.exists()


def test_a_committed_save_is_completed_by_the_next_load(tmp_path):
    old, new = _model(seed=1), _model(seed=2, lora_alpha=16)
    old.save_pretrained(tmp_path)
    staged = tmp_path / "staged"
    new.save_pretrained(staged)
    commit = tmp_path / tx.COMMIT_DIR
    commit.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(staged / name, commit / name)
    (commit / tx.MANIFEST).write_text(json.dumps({"files": ["adapter_config.json", "adapter_model.safetensors"],
                                                  "remove": ["adapter_model.bin"]}))
    os.replace(commit / "adapter_config.json", tmp_path / "adapter_config.json")  # killed after one move
    loaded = _load(tmp_path)
    assert not commit.exists()
    expected = get_peft_model_state_dict(new)
    got = get_peft_model_state_dict(loaded)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert loaded.peft_config["default"].lora_alpha == 16


@pytest.mark.parametrize("manifest", [
    {"files": ["../escape"], "remove": []},
    {"files": [], "remove": ["/etc/passwd"]},
    {"files": ["sub/adapter_config.json"], "remove": []},
    {"files": "adapter_config.json", "remove": []},
    {"remove": []},
    "[" * 5000 + "]" * 5000,
])
def test_a_hostile_pending_commit_is_refused_without_touching_anything(tmp_path, manifest):
    _model().save_pretrained(tmp_path)
    commit = tmp_path / tx.COMMIT_DIR
    commit.mkdir()
    (commit / "adapter_config.json").write_text("{}")
    (commit / tx.MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    outside = tmp_path.parent / "escape"
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != tx.COMMIT_DIR}
    with pytest.raises(AdapterLoadError, match="manifest"):
        _load(tmp_path)
    assert not outside.exists()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != tx.COMMIT_DIR} == before


def test_a_commit_that_is_not_a_directory_is_refused(tmp_path):
    _model().save_pretrained(tmp_path)
    (tmp_path / tx.COMMIT_DIR).write_text("not a directory")
    with pytest.raises(AdapterLoadError, match="not a directory written by a peftkit save"):
        _load(tmp_path)


def test_a_pending_commit_in_a_read_only_directory_is_a_typed_error(tmp_path, monkeypatch):
    _model().save_pretrained(tmp_path)
    commit = tmp_path / tx.COMMIT_DIR
    commit.mkdir()
    (commit / "adapter_config.json").write_text("{}")
    (commit / tx.MANIFEST).write_text(json.dumps({"files": ["adapter_config.json"], "remove": []}))

    def read_only(*args: object) -> None:  # what a read-only mount answers (root ignores chmod 0o555)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tx.os, "replace", read_only)
    with pytest.raises(AdapterLoadError, match="interrupted after it committed.*Read-only"):
        _load(tmp_path)


def test_replace_files_refuses_names_that_are_not_plain_file_names(tmp_path):
    for name in ("../x", "a/b", "", ".", "..", tx.COMMIT_DIR):
        with pytest.raises(ConfigError, match="plain file name"):
            tx.replace_files(tmp_path, {name: lambda path: None})
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_transaction_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _model().save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_locks_are_reentrant_and_released(tmp_path):
    with tx.locked(str(tmp_path), exclusive=True), tx.reading(tmp_path):
        _model().save_pretrained(tmp_path)  # a save inside a held lock of the same thread does not deadlock
    assert not tx._held
    assert _load(tmp_path) is not None
