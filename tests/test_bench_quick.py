"""CI smoke test of the mixed-batch benchmark (bench/mixed_batch.py --quick): it runs, reports every ratio for
every adapter count, and peftkit's mixed-batch logits match the reference's. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (
    "peftkit_mixed_over_single",
    "peftkit_mixed_over_reference_mixed",
    "reference_mixed_over_single",
    "peftkit_single_over_base",
    "reference_single_over_base",
)

pytestmark = pytest.mark.interop


def test_mixed_batch_bench_quick(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "mixed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mixed_batch.py"), "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert sorted(data["counts"]) == ["1", "4"]
    for count, entry in data["counts"].items():
        for clock in ("cpu", "wall"):
            for key in RATIOS:
                value = entry["ratios"][clock][key]
                assert isinstance(value, float) and value > 0, (count, clock, key, value)
        for lib in ("peftkit", "peft"):
            for variant in ("single", "mixed", "base"):
                assert entry["tokens_per_s"][lib][variant]["cpu"] > 0
        # the adapters change the output, and both libraries agree on it
        assert entry["adapter_effect"] > 1e-2, entry["adapter_effect"]
        assert entry["max_abs_diff_mixed_logits"] < 1e-4, entry["max_abs_diff_mixed_logits"]
        assert entry["max_abs_diff_single_logits"] < 1e-4, entry["max_abs_diff_single_logits"]
        assert max(entry["mixed_a0_rows_vs_single"].values()) < 1e-5
    assert "N = 4 adapters" in proc.stdout and "peftkit_mixed_over_reference_mixed" in proc.stdout


def test_mixed_batch_inprocess_bench_quick(tmp_path):
    """bench/mixed_batch_inprocess.py --quick: both libraries in one process; ratios present, logits agree."""
    pytest.importorskip("peft")
    out = tmp_path / "inproc.json"
    script = ROOT / "bench" / "mixed_batch_inprocess.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["count"] for r in results] == [1, 4]
    for entry in results:
        assert entry["max_abs_diff"] < 1e-4
        for clock in ("cpu", "wall"):
            assert entry[clock]["peftkit_mixed_over_reference_mixed"] > 0
            assert set(entry[clock]["tokens_per_s"]) == {"peftkit_single", "peftkit_mixed", "peft_single", "peft_mixed"}
