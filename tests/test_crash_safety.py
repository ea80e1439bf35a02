"""A save is all-or-nothing for an adapter directory (issue 16, item 3).

Crash consistency: a child process saving adapter "new" over a directory holding adapter "old" is SIGKILLed just
before its k-th file-system operation inside that directory (a ``sys.addaudithook`` hook sees every ``open`` for
writing, ``mkdir``, ``rename``/``replace``, ``remove``/``unlink``, ``rmdir``, ``chmod``, ``rmtree``, ...), for
k = 1, 2, ... until a save runs to the end unkilled. After every kill the directory must load (as users load it,
``PeftModel.from_pretrained``) as exactly the old or exactly the new adapter: the same config fields and the same
tensors, bit for bit (both are read back from files, no arithmetic happens). The scenarios cover the silent case
(same config and shapes, other values), a config change, a change of format (``.bin`` over safetensors) and a
two-adapter save.

Concurrency: two processes save different adapters into one directory over and over (one of them is SIGKILLed
half-way) while this process loads it in a loop: every load is exactly one of the two adapters.

Each scenario runs in one fresh interpreter that forks a child per kill (Linux/macOS: ``fork`` and ``SIGKILL``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork() and SIGKILL (POSIX)")

_COMMON = r"""
import json, os, shutil, signal, sys, time
import torch
sys.path.insert(0, {tests!r})
from models import MLP
from peftkit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

WORK = sys.argv[1]


def adapter(seed, **config):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model


def snapshot(model, name="default"):
    config = model.peft_config[name].to_dict()
    config.pop("inference_mode")
    config = json.loads(json.dumps(config, default=sorted))
    return config, get_peft_model_state_dict(model, adapter_name=name)


def same(a, b):
    # exact on purpose: both sides are tensors read back from files, no arithmetic in between
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def load(directory, name="default"):
    torch.manual_seed(0)
    sub = {{}} if name == "default" else {{"subfolder": name}}
    return snapshot(PeftModel.from_pretrained(MLP(), directory, adapter_name=name, **sub), name)


def which(directory, old, new, name="default"):
    # "old" / "new" / a description of anything else (a typed error is also a failure here)
    try:
        got = load(directory, name)
    except Exception as exc:
        return f"error {{type(exc).__name__}}: {{str(exc)[:300]}}"
    return "old" if same(got, old) else "new" if same(got, new) else "a mix of the two or something else"
"""

_CRASH = _COMMON + r"""
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = {{"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "shutil.rmtree", "os.truncate",
          "os.symlink", "os.link", "os.utime", "os.chown"}}


def inside(path, root):
    if isinstance(path, int):
        return False
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    return os.path.realpath(path).startswith(root + os.sep) or os.path.realpath(path) == root


def kill_before(k, root):
    count = [0]

    def hook(event, args):
        if event == "open":
            touches = len(args) >= 3 and isinstance(args[2], int) and args[2] & WRITE_FLAGS
        else:
            touches = event in EVENTS
        if touches and args and any(inside(a, root) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def run(scenario, old_model, new_model, names, safe_new):
    ref_old, ref_new = os.path.join(WORK, scenario + "-old"), os.path.join(WORK, scenario + "-new")
    old_model.save_pretrained(ref_old)
    new_model.save_pretrained(ref_new, safe_serialization=safe_new)
    old = {{n: load(ref_old, n) for n in names}}
    new = {{n: load(ref_new, n) for n in names}}
    assert all(not same(old[n], new[n]) for n in names)
    outcomes = []
    for k in range(1, 200):
        target = os.path.join(WORK, f"{{scenario}}-{{k}}")
        shutil.copytree(ref_old, target)
        pid = os.fork()
        if pid == 0:
            kill_before(k, os.path.realpath(target))
            new_model.save_pretrained(target, safe_serialization=safe_new)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed and os.WEXITSTATUS(status) != 0:
            outcomes.append({{"k": k, "problem": f"the saving child failed with status {{status}}"}})
            break
        got = {{n: which(target, old[n], new[n], n) for n in names}}
        leftovers = sorted(f for f in os.listdir(target) if f.startswith(".peftkit-commit"))
        outcomes.append({{"k": k, "killed": killed, "got": got, "leftovers": leftovers}})
        if not killed:
            break
        # the next save over a crashed directory completes, and leaves no staging directory behind
        new_model.save_pretrained(target, safe_serialization=safe_new)
        after = {{n: which(target, old[n], new[n], n) for n in names}}
        stray = sorted(f for f in os.listdir(target) if f.startswith(".peftkit"))
        outcomes[-1].update(after_resave=after, stray=stray)
        shutil.rmtree(target)
    return outcomes


same_shapes = dict(r=2, lora_alpha=4, target_modules=["lin0"])
results = {{
    "same-config": run("same-config", adapter(1, **same_shapes), adapter(2, **same_shapes), ["default"], True),
    # the silent case: same shapes, another scaling; a mix would load without any error
    "same-shapes": run("same-shapes", adapter(1, **same_shapes), adapter(2, **{{**same_shapes, "lora_alpha": 16}}),
                       ["default"], True),
    "other-config": run("other-config", adapter(1, **same_shapes),
                        adapter(2, r=4, lora_alpha=8, target_modules=["lin0", "lin1"]), ["default"], True),
    "bin-over-safetensors": run("bin", adapter(1, **same_shapes), adapter(2, **same_shapes), ["default"], False),
}}
two_old, two_new = adapter(1, **same_shapes), adapter(2, **same_shapes)
two_old.add_adapter("other", LoraConfig(r=3, target_modules=["lin1"], init_lora_weights=False))
two_new.add_adapter("other", LoraConfig(r=5, target_modules=["lin1"], init_lora_weights=False))
with torch.no_grad():
    for model, value in ((two_old, 0.5), (two_new, -0.25)):
        for name, param in model.named_parameters():
            if ".other." in name:
                param.fill_(value)
results["two-adapters"] = run("two", two_old, two_new, ["default", "other"], True)
print(json.dumps(results))
"""


def _run(script: str, tmp_path: Path, timeout: int = 600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script.format(tests=str(Path(__file__).parent)), str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crash_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(_CRASH, tmp_path_factory.mktemp("crash"))


@pytest.mark.parametrize("scenario", ["same-config", "same-shapes", "other-config", "bin-over-safetensors", "two-adapters"])
def test_killed_save_leaves_old_or_new_adapter(crash_results: dict, scenario: str) -> None:
    outcomes = crash_results[scenario]
    assert outcomes and not any("problem" in o for o in outcomes), outcomes
    killed = [o for o in outcomes if o["killed"]]
    assert len(killed) >= 8, outcomes  # every step of the save was a kill point: there are many
    assert not outcomes[-1]["killed"] and set(outcomes[-1]["got"].values()) == {"new"}, outcomes[-1]
    assert set(killed[0]["got"].values()) == {"old"}, killed[0]  # killed before anything was written
    for o in killed:
        assert set(o["got"].values()) <= {"old", "new"}, o
        assert o["leftovers"] == [], o  # a load finishes a committed save
        assert set(o["after_resave"].values()) == {"new"} and o["stray"] == [], o
    # per adapter, once a kill point gives "new", every later one does too (a single commit point)
    for name in outcomes[-1]["got"]:
        seq = [o["got"][name] for o in killed]
        assert "old" not in seq[seq.index("new"):] if "new" in seq else True, seq
    assert any(o["got"] == {n: "new" for n in o["got"]} for o in killed), "no kill point after the commit"


_CONCURRENT = _COMMON + r"""
target = os.path.join(WORK, "shared")
first = adapter(1, r=2, lora_alpha=4, target_modules=["lin0"])
second = adapter(2, r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
first.save_pretrained(target)
refs = {{"first": load(target)}}
second.save_pretrained(os.path.join(WORK, "second"))
refs["second"] = load(os.path.join(WORK, "second"))


def saver(model, rounds):
    pid = os.fork()
    if pid == 0:
        for _ in range(rounds):
            model.save_pretrained(target)
        os._exit(0)
    return pid


pids = [saver(first, 60), saver(second, 60)]
seen = []
victim_killed = False
for i in range(80):
    try:
        got = load(target)
        seen.append(next((name for name, ref in refs.items() if same(got, ref)), "a mix or something else"))
    except Exception as exc:
        seen.append(f"error {{type(exc).__name__}}: {{str(exc)[:300]}}")
    if i == 20:
        os.kill(pids[1], signal.SIGKILL)  # one saver dies half-way through its saves
        victim_killed = True
statuses = [os.waitpid(pid, 0)[1] for pid in pids]
final = load(target)
seen_final = next((name for name, ref in refs.items() if same(final, ref)), "a mix or something else")
print(json.dumps({{"seen": seen, "final": seen_final, "first_status": statuses[0], "killed": victim_killed}}))
"""


def test_concurrent_savers_and_a_reader(tmp_path: Path) -> None:
    result = _run(_CONCURRENT, tmp_path)
    assert result["killed"] and result["first_status"] == 0, result
    assert set(result["seen"]) <= {"first", "second"}, result["seen"]
    assert result["final"] in {"first", "second"}, result
