"""``peftkit train`` / ``inspect`` / ``merge`` / ``generate`` with trainable tokens: the TrainableTokens method
(``--method trainable-tokens --option token_indices=[...]``) and LoRA's ``--option trainable_token_indices=...``.
The adapters load in the reference with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import _CORPUS, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import peftkit
from peftkit.cli.app import app
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")


def cli(*args: str | Path, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(f"exit {result.exit_code} != {code}\n{result.output}\n{result.exception!r}")
    return result.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """A tiny Llama + tokenizer saved together, a text file, and three token ids the texts contain."""
    work = tmp_path_factory.mktemp("cli_tokens")
    model_dir = work / "llama"
    tiny_llama().save_pretrained(model_dir)
    tokenizer = tiny_tokenizer("bpe")
    tokenizer.save_pretrained(model_dir)
    data = work / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _CORPUS[:4]), encoding="utf-8")
    ids = list(dict.fromkeys(tokenizer(_CORPUS[0])["input_ids"]))[:3]
    return model_dir, data, ids


def _train(setup: tuple[Path, Path, list[int]], out: Path, *method: str) -> None:
    model_dir, data, _ = setup
    cli("train", "--model", model_dir, "--data", data, *method, "--max-steps", "2", "--batch-size", "2",
        "--lr", "5e-2", "--output", out, "--no-progress")


def _same_logits_in_reference(model_dir: Path, out: Path) -> None:
    ids = torch.tensor([[1, 5, 9, 3, 60, 7]])
    kit = peftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    with torch.no_grad():
        # both libraries run the same math with their own code paths
        torch.testing.assert_close(kit(ids).logits, ref(ids).logits, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


def test_train_inspect_generate_trainable_tokens(setup, tmp_path: Path) -> None:
    model_dir, _, ids = setup
    out = tmp_path / "tt"
    _train(setup, out, "--method", "trainable-tokens", "--option", f"token_indices={json.dumps(ids)}")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == ids
    rows = load_file(str(out / "adapter_model.safetensors"))["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).model.embed_tokens.weight[ids]
    assert (rows - base).abs().amax(dim=1).gt(0).all()  # every chosen row trained (they occur in the data)
    info = json.loads(cli("inspect", out, "--json"))
    assert info["adapted_modules"] == 0 and info["token_rows"] == {"model.embed_tokens": [3, 32]}
    assert info["parameters"] == 3 * 32
    assert "token rows:     model.embed_tokens 3x32" in cli("inspect", out)
    assert cli("generate", out, "--prompt", "the quick", "--max-new-tokens", "3").strip()
    _same_logits_in_reference(model_dir, out)


@pytest.mark.parametrize("form", ["list", "dict"])
def test_train_lora_with_trainable_token_indices(setup, tmp_path: Path, form: str) -> None:
    model_dir, _, ids = setup
    value = ids if form == "list" else {"embed_tokens": ids}
    out = tmp_path / "lora"
    _train(setup, out, "--method", "lora", "--option", f"trainable_token_indices={json.dumps(value)}")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == value
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    info = json.loads(cli("inspect", out, "--json"))
    assert info["adapted_modules"] == 4 and info["token_rows"] == {"model.embed_tokens": [3, 32]}
    _same_logits_in_reference(model_dir, out)
    merged = tmp_path / "merged"
    cli("merge", out, "--output", merged)
    weight = AutoModelForCausalLM.from_pretrained(merged).model.embed_tokens.weight[ids]
    rows = load_file(str(out / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(weight, rows)  # merging writes the rows themselves
