"""Runs an ``examples/`` training script in a subprocess on tiny models (shared by the Trainer and TRL tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_example(script: str, out: Path | str, steps: int) -> dict:
    """Run ``examples/<script> --out <out> --steps <steps>``; assert it exits 0, reports a matching reload and wrote
    adapter files under ``<out>/adapter``; return its ``summary.json``."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(root / "examples" / script), "--out", str(out), "--steps", str(steps)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "reloaded outputs match: True" in proc.stdout
    adapter = Path(out) / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    return json.loads((Path(out) / "summary.json").read_text())
