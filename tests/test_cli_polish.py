"""The ``peftkit`` command's polish for a newcomer (issue 19, item 6): ``-o key=value`` spellings, help that reads
well at 80 columns, a ``--version`` that imports no torch, no library noise on stderr, a fast one-line error for an
unknown Hub id, a model card without local paths, and the README/LICENSE/package metadata.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomllib
import typer
from models import tiny_llama, tiny_tokenizer
from typer.testing import CliRunner, Result

from peftkit import LoraConfig, get_peft_model
from peftkit.cli import common
from peftkit.cli.app import app
from peftkit.cli.common import CliError, build_config, parse_options

ROOT = Path(__file__).resolve().parent.parent


def _invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and a byte-level BPE tokenizer saved together (a local "model id")."""
    path = tmp_path_factory.mktemp("polish") / "llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer("bpe").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(llama_dir: Path) -> Path:
    """A LoRA adapter saved by peftkit on ``llama_dir`` (its config names that directory as the base)."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    path = llama_dir.parent / "adapter"
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- 1. -o spellings
def test_option_values_accept_json_and_python_spellings() -> None:
    parsed = parse_options(["a=True", "b=false", "c=None", "d=null", "e=['q_proj', 'v_proj']", 'f=["x"]',
                            "g=pissa", "h=3", "i={'k': 1}", "j=0.5", "k=a=b"])
    assert parsed == {"a": True, "b": False, "c": None, "d": None, "e": ["q_proj", "v_proj"], "f": ["x"],
                      "g": "pissa", "h": 3, "i": {"k": 1}, "j": 0.5, "k": "a=b"}


@pytest.mark.parametrize(("spelling", "expected"), [
    ("True", True), ("true", True), ("yes", True), ("1", True), ("on", True),
    ("False", False), ("false", False), ("no", False), ("0", False), ("off", False),
])
def test_boolean_fields_accept_the_obvious_spellings(spelling: str, expected: bool) -> None:
    config = build_config("lora", "CAUSAL_LM", {}, parse_options([f"use_dora={spelling}"]))
    assert config.use_dora is expected


def test_yes_no_stay_strings_where_the_field_is_not_a_plain_bool() -> None:
    # init_lora_weights is ``bool | str``: true/false are booleans, any other word is one of its string values
    assert build_config("lora", "CAUSAL_LM", {}, parse_options(["init_lora_weights=False"])).init_lora_weights is False
    assert build_config("lora", "CAUSAL_LM", {}, parse_options(["init_lora_weights=gaussian"])).init_lora_weights \
        == "gaussian"
    config = build_config("lora", "CAUSAL_LM", {}, parse_options(["target_modules=['q_proj','v_proj']"]))
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]


def test_unparsable_option_values_are_one_line_naming_the_key() -> None:
    with pytest.raises(CliError, match=r"^--option target_modules=\['q_proj', is not a valid value: .*list"):
        parse_options(["target_modules=['q_proj',"])
    with pytest.raises(CliError, match=r"^--option use_dora='maybe': LoraConfig.use_dora is a boolean; allowed: "
                                       r"true/false, yes/no, on/off, 1/0$"):
        build_config("lora", "CAUSAL_LM", {}, parse_options(["use_dora=maybe"]))


# ---------------------------------------------------------------------------------------------- 2. help
def _commands() -> dict[str, Any]:
    return dict(typer.main.get_command(app).commands)


def _help(*args: str) -> str:
    result = _invoke(*args, "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["", *_commands()])
def test_help_fits_80_columns_and_cuts_no_word(command: str) -> None:
    out = _help(*([command] if command else []))
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out, out  # rich's cut of a long word; a word dropped by click's "..." is caught below
    words = set(re.sub(r"-\n\s+", "-", out).split())  # a line may break after a hyphen, as in print
    helps = [c.get_short_help_str(10_000) for c in _commands().values()] if not command else \
        [p.help for p in _commands()[command].params if getattr(p, "help", None)]
    for text in helps:
        missing = [w for w in text.split() if w not in words]
        assert not missing, f"help words cut or lost: {missing}\n{out}"


def test_plot_help_keeps_the_extra_in_brackets() -> None:
    assert "peftkit[plot]" in _help("inspect")


@pytest.mark.parametrize("command", list(_commands()))
def test_boolean_flags_are_shown_without_a_value(command: str) -> None:
    out = _help(command)
    assert "<bool>" not in out and "BOOLEAN" not in out, out
    for param in _commands()[command].params:
        if getattr(param, "is_flag", False) and not param.hidden and param.secondary_opts:
            assert f"{param.opts[0]} / {param.secondary_opts[0]}" in out, out


# ---------------------------------------------------------------------------------------------- 3. --version
def test_version_imports_no_torch_and_is_fast() -> None:
    code = "import peftkit_launcher; peftkit_launcher.main(['--version'])"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, proc.stderr
    from peftkit import __version__

    assert proc.stdout.strip() == f"peftkit {__version__}"
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")][1:]
    modules = {row[2].strip() for row in rows}
    assert not {m for m in modules if m.split(".")[0] in ("torch", "transformers", "peftkit", "typer")}
    total_us = sum(int(row[0].split(":")[1]) for row in rows)  # self times: every import once
    assert total_us < 300_000, f"{total_us} us of imports"


def test_console_script_is_the_launcher_and_it_runs_every_other_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == {"peftkit": "peftkit_launcher:main"}
    proc = subprocess.run([sys.executable, "-c", "import peftkit_launcher; peftkit_launcher.main(['methods'])"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, proc.stderr
    assert "lora" in proc.stdout.split()


# ---------------------------------------------------------------------------------------------- 4. noise
NOISE = ("Failed to load", "_pytree", "is an Enum subclass", "kernels-community")


def test_commands_print_no_library_noise(adapter_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "peftkit", "merge", str(adapter_dir), "--output",
                           str(tmp_path / "merged")], capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    noisy = [line for line in (proc.stderr + proc.stdout).splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy)


def test_noise_filters_drop_only_the_known_messages() -> None:
    import logging

    common.quiet_library_noise()
    records = [logging.LogRecord("torchao", logging.WARNING, "x", 1, "Failed to load /x/_C.so: nope", None, None),
               logging.LogRecord("torchao", logging.WARNING, "x", 1, "something else", None, None)]
    assert [logging.getLogger("torchao").filter(r) for r in records] == [False, True]
    enum_msg = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
                "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future "
                "release.")
    record = logging.LogRecord("torch.utils._pytree", logging.WARNING, "x", 1, enum_msg, ("E",), None)
    assert not logging.getLogger("torch.utils._pytree").filter(record)


# ---------------------------------------------------------------------------------------------- 5. unknown hub id
UNKNOWN = "no-such-org/no-such-model"


def test_unknown_hub_id_offline_is_one_fast_line(adapter_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def _slow(*_a: object, **_k: object) -> None:
        raise AssertionError("transformers was asked to download")

    for auto_cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto_cls, "from_pretrained", _slow)
    start = time.perf_counter()
    result = _invoke("merge", adapter_dir, "--model", UNKNOWN, "--output", tmp_path / "o")
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2, result.output
    assert _errors(result.output) == [(
        f"error: cannot load model {UNKNOWN!r}: not a local directory, and not in the Hugging Face cache "
        "(HF_HUB_OFFLINE is set)")]


def _fake_model_info(exc: Exception):
    def model_info(repo_id: str, **kwargs: object) -> None:
        assert kwargs.get("timeout") and kwargs["timeout"] <= 10
        raise exc
    return model_info


@pytest.mark.parametrize(("exc_name", "expected"), [
    ("RepositoryNotFoundError", ("not a local directory, and not found on the Hugging Face Hub (unknown id, or a "
                                 "private repo: log in with `hf auth login`)")),
    ("GatedRepoError", ("a gated repo on the Hugging Face Hub: accept its conditions on "
                        f"https://huggingface.co/{UNKNOWN} and log in with `hf auth login`")),
    ("ConnectError", ("not a local directory, not in the Hugging Face cache, and the Hub could not be reached "
                      "(offline?)")),
])
def test_unknown_hub_id_online_is_checked_with_one_short_request(
        exc_name: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2 as httpx  # the HTTP client of this huggingface_hub
    import huggingface_hub

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    exc = {"RepositoryNotFoundError": lambda: huggingface_hub.errors.RepositoryNotFoundError("404", response=response),
           "GatedRepoError": lambda: huggingface_hub.errors.GatedRepoError("403", response=response),
           "ConnectError": lambda: httpx.ConnectError("[Errno -2] Name or service not known")}[exc_name]()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", _fake_model_info(exc))
    for check in (common.check_model, lambda n: common.load_base_model(n, "CAUSAL_LM"), common.load_tokenizer):
        with pytest.raises(CliError) as info:
            check(UNKNOWN)
        message = str(info.value)
        assert expected in message and "\n" not in message, message


def test_a_cached_hub_id_is_accepted_offline_and_a_missing_path_is_named(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--cached-org--tokenizer-only" / "snapshots" / "abc123").mkdir(parents=True)
    common.check_hub_id("cached-org/tokenizer-only")  # no config.json needed: a tokenizer repo counts too
    with pytest.raises(CliError, match=r"^cannot load model '/no/such/dir': not a local directory \(no such "
                                       r"directory\), and not a Hugging Face Hub id \(owner/name\)$"):
        common.model_ref("/no/such/dir")


def test_error_from_a_directory_without_a_model_is_a_complete_line(tmp_path: Path) -> None:
    with pytest.raises(CliError) as info:
        common.check_model(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"cannot load model {str(tmp_path)!r}: the directory has no loadable model")
    assert message.endswith(")") and "\n" not in message and not message.endswith("https://)"), message


# ---------------------------------------------------------------------------------------------- 6. model card
def test_model_card_has_no_local_paths(tmp_path: Path) -> None:
    import transformers

    base_dir = tmp_path / "secret-place" / "my-base"
    tiny_llama().save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert str(tmp_path) not in card and "secret-place" not in card, card
    header = card.split("---\n")[1].splitlines()
    assert "library_name: peft" in header and not any(line.startswith("base_model") for line in header)
    assert "- base_model:adapter" not in card
    assert "local directory `my-base`" in card
    # the adapter config keeps the path (loading needs it), as the reference does
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(base_dir)


def test_model_card_keeps_a_hub_id() -> None:
    from peftkit.serialization.model_card import render_model_card

    config = LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path="owner/tiny-llama")
    card = render_model_card({"default": config}, True)
    assert "base_model: owner/tiny-llama\n" in card and "- base_model:adapter:owner/tiny-llama\n" in card


# ---------------------------------------------------------------------------------------------- 7. README, LICENSE
def test_license_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:3] == ["Apache", "License", "Version"] and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_package_long_description_is_the_readme() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["readme"] == {"file": "README.md", "content-type": "text/markdown"}


def test_readme_has_an_installation_section() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Installation\n(.*?)^## ", readme, re.MULTILINE | re.DOTALL)
    assert match, "no ## Installation section"
    section = match.group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for extra in ("plot", "bnb", "dev"):
        assert extra in project["optional-dependencies"] and f"peftkit[{extra}]" in section
    assert "pip install" in section and "source .venv/bin/activate" in section and "scripts/setup.sh" in section
    assert "PATH" in section
