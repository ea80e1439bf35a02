"""Every ```python block of README.md and docs/*.md runs here.

How the blocks run:

- The ```python blocks of one file run in order, in one namespace (a guide builds on its earlier blocks), in a
  fresh temporary working directory. One test per file; a failure names the file and the line of the block.
- ```bash / ```text / ```json blocks are not run (shell commands such as ``torchrun``, or GPU-only code, go there).
- Hub ids in the text are replaced by local tiny models, saved once per session with ``save_pretrained`` together
  with an in-process tokenizer (``tests/models.py``). ``HUB_IDS`` below is the substitution table: a quoted
  occurrence of an id, ``"<id>"`` or ``'<id>'``, becomes the quoted local directory. Nothing touches the network.
- Fence-info convention: ```` ```python fragment ```` marks a block that only continues names defined by the
  blocks before it in the same file (it is run like every other block; the tag only tells a reader it is not
  self-contained). There is no hidden setup code: every name a block uses is defined in the file itself.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from models import tiny_bert, tiny_llama, tiny_t5, tiny_tokenizer, tiny_whisper

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: hub id -> (tiny model factory, with a tokenizer saved beside it). Each model is saved with save_pretrained.
HUB_IDS = {
    "meta-llama/Llama-3.2-1B": (lambda: tiny_llama("CAUSAL_LM"), True),
    "google-t5/t5-small": (tiny_t5, True),
    "bert-base-uncased": (lambda: tiny_bert("SEQ_CLS"), True),
    "openai/whisper-tiny": (tiny_whisper, False),
}

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    info: str  # fence info string, e.g. "python" or "python fragment"
    code: str


def extract_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order."""
    blocks = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append(Block(line, m.group(1).strip(), m.group(2)))
    return blocks


def python_blocks(text: str) -> list[Block]:
    return [b for b in extract_blocks(text) if b.info.split()[:1] == ["python"]]


def substitute_hub_ids(code: str, paths: dict[str, str]) -> str:
    for hub_id, path in paths.items():
        for q in ('"', "'"):
            code = code.replace(f"{q}{hub_id}{q}", f"{q}{path}{q}")
    return code


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub")
    paths = {}
    tok = tiny_tokenizer()
    for hub_id, (factory, with_tokenizer) in HUB_IDS.items():
        path = root / hub_id.replace("/", "--")
        factory().save_pretrained(path)
        if with_tokenizer:
            tok.save_pretrained(path)
        paths[hub_id] = str(path)
    return paths


def test_extract_blocks_numbers_lines_and_keeps_fence_info() -> None:
    text = "# t\n\n```python\nx = 1\n```\n\ntext\n```bash\nls\n```\n```python fragment\ny = x\n```\n"
    blocks = extract_blocks(text)
    assert [(b.line, b.info) for b in blocks] == [(3, "python"), (8, "bash"), (11, "python fragment")]
    assert [b.code for b in python_blocks(text)] == ["x = 1\n", "y = x\n"]


def test_substitution_replaces_only_quoted_ids() -> None:
    code = 'a = "bert-base-uncased"; b = \'bert-base-uncased\'; c = "bert-base-uncased-v2"  # bert-base-uncased'
    out = substitute_hub_ids(code, {"bert-base-uncased": "/tmp/bert"})
    assert out == 'a = "/tmp/bert"; b = \'/tmp/bert\'; c = "bert-base-uncased-v2"  # bert-base-uncased'


def test_every_doc_has_python_blocks() -> None:
    names = {p.name for p in DOC_FILES}
    expected = {"README.md", "methods.md", "multiple_adapters.md", "merging.md", "quantization.md", "training.md",
                "migrating.md"}
    assert expected <= names, expected - names
    for path in DOC_FILES:
        assert python_blocks(path.read_text(encoding="utf-8")), f"{path.name} has no ```python block"


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_doc_code_blocks_run(path: Path, hub_models: dict[str, str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(ROOT))  # so a guide may import examples/...
    namespace: dict[str, object] = {"__name__": f"doc_{path.stem}"}
    torch.manual_seed(0)
    rel = path.relative_to(ROOT)
    for block in python_blocks(path.read_text(encoding="utf-8")):
        code = substitute_hub_ids(block.code, hub_models)
        # pad with newlines so tracebacks show the markdown file's line numbers
        source = "\n" * block.line + code
        try:
            exec(compile(source, str(rel), "exec"), namespace)  # noqa: S102 - running the docs is the point
        except Exception as exc:  # re-raised with the block's location
            lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(rel)]
            where = f", line {lines[-1]}" if lines else ""
            raise AssertionError(f"{rel}: the python block at line {block.line} failed{where}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    assert os.getcwd() == str(tmp_path), "a block changed the working directory"
