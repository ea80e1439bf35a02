"""A config whose ``r`` disagrees with its checkpoint (issue 16, item 6) fails with a typed error before the adapter
tensors of the config's size are allocated, for inference and trainable loads alike, and leaves the model as it was.

Each case runs in a fresh interpreter so that peak RSS (``ru_maxrss``) measures that load alone. ``r=10**6`` on two
32-wide ``q_proj`` layers asks for ~512 MB of float32 adapter tensors; the limit below is far under that and far over
what the failed load itself needs (the tiny model, the r=4 checkpoint, Python objects).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ABSURD_R = 10**6
LIMIT_MB = 200

_SCRIPT = r"""
import json, resource, sys
import torch
sys.path.insert(0, {tests!r})
from models import tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import AdapterLoadError, ShapeMismatchError  # AdapterMismatchError is an AdapterLoadError

entry, trainable, adapter_dir = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
if entry == "from_pretrained":
    model = tiny_llama()
    before = {{k: v.clone() for k, v in model.state_dict().items()}}
else:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = {{k: v.clone() for k, v in model.state_dict().items()}}
modules = [name for name, _ in model.named_modules()]
grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if entry == "from_pretrained":
        PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    else:
        model.load_adapter(adapter_dir, "other", is_trainable=trainable)
    error = None
except (ShapeMismatchError, AdapterLoadError) as exc:
    error = type(exc).__name__
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
after = model.state_dict()
# nothing may have been written: the very same tensors, compared exactly
unchanged = (list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
             and [name for name, _ in model.named_modules()] == modules
             and [(n, p.requires_grad) for n, p in model.named_parameters()] == grads)
if entry == "load_adapter":
    unchanged = unchanged and list(model.peft_config) == ["default"]
print(json.dumps({{"error": error, "grown_mb": (peak - start) / 1024, "unchanged": unchanged}}))
"""


@pytest.fixture(scope="module", params=["other-writer", "peftkit"])
def absurd_adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An r=4 LoRA checkpoint of ``tiny_llama``'s ``q_proj`` layers whose config claims ``r=ABSURD_R``, and the
    error its load must raise. "peftkit": the weights keep the config they were saved with, so the edited config
    is a mismatch (``AdapterMismatchError``); "other-writer": weights without it (as the reference writes them),
    so only the shape check can catch it (``ShapeMismatchError``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from models import tiny_llama
    from safetensors.torch import load_file, save_file

    from peftkit import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("absurd_r")
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(path)
    if request.param == "other-writer":
        weights = str(path / "adapter_model.safetensors")
        save_file(load_file(weights), weights, metadata={"format": "pt"})
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = ABSURD_R
    config_file.write_text(json.dumps(config))
    return path, "ShapeMismatchError" if request.param == "other-writer" else "AdapterMismatchError"


@pytest.mark.parametrize("trainable", [False, True], ids=["inference", "trainable"])
@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
def test_absurd_rank_fails_before_allocating(absurd_adapter: tuple[Path, str], entry: str, trainable: bool) -> None:
    adapter_dir, expected = absurd_adapter
    script = _SCRIPT.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, entry, "1" if trainable else "0", str(adapter_dir)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] == expected, result
    assert result["grown_mb"] < LIMIT_MB, result
    assert result["unchanged"], result


# --------------------------------------------------------------------------------- every method, every init path
_METHOD_SCRIPT = r"""
import json, resource, sys, warnings
import torch
sys.path.insert(0, {tests!r})
from models import tiny_llama
from peftkit import PeftModel
from peftkit.errors import PeftError

adapter_dir = sys.argv[1]
warnings.simplefilter("ignore")
model = tiny_llama()
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
for trainable in (False, True):
    try:
        PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
        errors.append(None)
    except PeftError as exc:
        errors.append(type(exc).__name__)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"errors": errors, "grown_mb": (peak - start) / 1024}}))
"""

#: (config of the saved r=4 adapter, edits that make its config absurd, the error every load must raise)
_ABSURD = {
    # the init reads or rewrites the base weights, so it runs even for inference loads: a meta probe checks first
    "lora-pissa": ({"peft_type": "LORA", "init_lora_weights": "pissa"}, {"r": ABSURD_R}, "ShapeMismatchError"),
    "lora-olora": ({"peft_type": "LORA", "init_lora_weights": "olora"}, {"r": ABSURD_R}, "ShapeMismatchError"),
    "lora-dora": ({"peft_type": "LORA", "use_dora": True}, {"r": ABSURD_R}, "ShapeMismatchError"),
    # methods whose layers used to create and init their tensors before any check
    "loha": ({"peft_type": "LOHA"}, {"r": ABSURD_R}, "ShapeMismatchError"),
    # (LoKr is not here: past max(a, c) / 2 its factors are full matrices whatever r says, so a huge r loads)
    "adalora": ({"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10},
                {"init_r": ABSURD_R, "r": ABSURD_R}, "ShapeMismatchError"),
    # a targeted module with no tensor in the checkpoint: no shape to compare, the missing bytes are bounded
    "lora-missing-module": ({"peft_type": "LORA"},
                            {"target_modules": ["q_proj", "k_proj"], "rank_pattern": {"k_proj": ABSURD_R}},
                            "AdapterLoadError"),
}


@pytest.mark.parametrize("case", list(_ABSURD))
def test_absurd_sizes_fail_before_allocating_for_every_method(case: str, tmp_path: Path) -> None:
    """A config claiming sizes its checkpoint does not back (weights without peftkit's saved config, as another
    writer leaves them) fails with a typed error, for inference and trainable loads, without allocating them."""
    sys.path.insert(0, str(Path(__file__).parent))
    from models import tiny_llama
    from saved_files import drop_saved_config

    from peftkit import PeftConfig, get_peft_model

    saved, edits, expected = _ABSURD[case]
    config = PeftConfig.from_dict({"r": 4, "target_modules": ["q_proj"], **saved})
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    drop_saved_config(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edits}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _METHOD_SCRIPT.format(tests=str(Path(__file__).parent)),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [expected, expected], result
    assert result["grown_mb"] < LIMIT_MB, result
