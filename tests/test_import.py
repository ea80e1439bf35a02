"""peftkit never imports the reference ``peft``; ``import peftkit`` stays cheap (no transformers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import peftkit

SRC = Path(peftkit.__file__).resolve().parent


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)


def test_import_does_not_load_peft_or_transformers():
    proc = _run(
        "import sys, peftkit\n"
        "assert 'peft' not in sys.modules, 'peft imported'\n"
        "assert not any(m == 'transformers' or m.startswith('transformers.') for m in sys.modules), 'transformers'\n"
        "print(peftkit.__version__)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == peftkit.__version__


def test_using_peftkit_on_a_transformers_model_does_not_load_peft(tmp_path):
    proc = _run(
        "import sys, torch, peftkit\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "m = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))\n"
        "pm = peftkit.get_peft_model(m, peftkit.LoraConfig(task_type='CAUSAL_LM'))\n"
        "pm.save_pretrained(sys.argv[1])\n"
        "peftkit.PeftModel.from_pretrained(GPT2LMHeadModel(m.config), sys.argv[1])\n"
        "assert 'peft' not in sys.modules and not any(k.startswith('peft.') for k in sys.modules)\n",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr


def test_no_source_file_imports_peft():
    pattern = re.compile(r"^\s*(import\s+peft\b|from\s+peft(\.|\s))", re.MULTILINE)
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    offenders = [str(f.relative_to(SRC)) for f in files if pattern.search(f.read_text(encoding="utf-8"))]
    assert offenders == []
    # the pattern does catch the forms it must catch, and not peftkit's own imports
    assert pattern.search("import peft\n") and pattern.search("from peft.tuners import x\n")
    assert pattern.search("    from peft import LoraConfig\n")
    assert not pattern.search("import peftkit\nfrom peftkit.config import x\n")
