"""Every ```python block of README.md and docs/*.md runs here.

How the blocks run:

- The ```python blocks of one file run in order, in one namespace (a guide builds on its earlier blocks), in a
  fresh temporary working directory. One test per file; a failure names the file and the line of the block.
- ```bash / ```text / ```json blocks are not run (shell commands such as ``torchrun``, or GPU-only code, go there).
- Hub ids in the text are replaced by local tiny models, saved once per session with ``save_pretrained`` together
  with an in-process tokenizer. ``HUB_IDS`` below is the substitution table: a quoted occurrence of an id,
  ``"<id>"`` or ``'<id>'``, becomes the quoted local directory. Nothing touches the network.
- A stand-in keeps the properties of the real model that a guide's code depends on, so a guide that would fail on
  the real model fails here too. The causal LM of the guides is ``HuggingFaceTB/SmolLM2-135M`` (open, no licence
  to accept): a Llama with tied input/output embeddings whose GPT-2-style byte-level BPE tokenizer has
  ``<|endoftext|>`` (id 0) as its bos, eos and unk token, ``<|im_start|>`` / ``<|im_end|>`` (ids 1, 2) as extra
  special tokens, no pad token and no chat template. Its stand-in, :func:`smollm2_tokenizer` and
  :func:`smollm2_model`, has the same: a guide that pads without setting a pad token fails as it would for a user.
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
from models import (
    _CORPUS,
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    MAX_POS,
    VOCAB,
    tiny_bert,
    tiny_t5,
    tiny_tokenizer,
    tiny_whisper,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: the causal LM of the guides, and the special tokens of its tokenizer (HuggingFaceTB/SmolLM2-135M:
#: tokenizer_config.json / special_tokens_map.json; config.json has bos_token_id = eos_token_id = 0, no pad_token_id,
#: tie_word_embeddings = true)
CAUSAL_LM_ID = "HuggingFaceTB/SmolLM2-135M"
SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: hub ids a guide must not use: gated (a licence to accept, a token to log in with)
GATED_PREFIXES = ("meta-llama/", "mistralai/", "google/gemma")


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """Stand-in for the tokenizer of ``HuggingFaceTB/SmolLM2-135M``, trained in memory on the tiny corpus.

    Byte-level BPE that adds no bos token; ``<|endoftext|>`` = 0 is bos, eos and unk; ``<|im_start|>`` = 1 and
    ``<|im_end|>`` = 2 are extra special tokens; no pad token and no chat template, as in the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eot = SMOLLM2_SPECIALS[0]
    tok = Tokenizer(models.BPE(unk_token=eot))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SMOLLM2_SPECIALS, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot,
                                   additional_special_tokens=SMOLLM2_SPECIALS)
    assert len(fast) <= VOCAB, len(fast)
    return fast


def smollm2_model() -> PreTrainedModel:
    """Stand-in for ``HuggingFaceTB/SmolLM2-135M``: a tiny ``LlamaForCausalLM`` (the shapes of ``tests/models.py``)
    with the real config's token ids (bos = eos = 0, no pad id) and tied input/output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                         bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


#: hub id -> (tiny model factory, tokenizer factory or None). Each is saved with save_pretrained.
HUB_IDS = {
    CAUSAL_LM_ID: (smollm2_model, smollm2_tokenizer),
    "google-t5/t5-small": (tiny_t5, tiny_tokenizer),
    "bert-base-uncased": (lambda: tiny_bert("SEQ_CLS"), tiny_tokenizer),
    "openai/whisper-tiny": (tiny_whisper, None),
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
    for hub_id, (factory, tokenizer_factory) in HUB_IDS.items():
        path = root / hub_id.replace("/", "--")
        factory().save_pretrained(path)
        if tokenizer_factory is not None:
            tokenizer_factory().save_pretrained(path)
        paths[hub_id] = str(path)
    return paths


def run_doc(text: str, rel: str, hub_models: dict[str, str]) -> None:
    """Run the ```python blocks of the markdown ``text`` in order, in one namespace, in the current directory.

    A failing block raises ``AssertionError`` naming ``rel`` (the file), the block's opening line and the failing
    line, with the block's exception as its cause."""
    namespace: dict[str, object] = {"__name__": f"doc_{Path(rel).stem}"}
    torch.manual_seed(0)
    for block in python_blocks(text):
        code = substitute_hub_ids(block.code, hub_models)
        # pad with newlines so tracebacks show the markdown file's line numbers
        source = "\n" * block.line + code
        try:
            exec(compile(source, rel, "exec"), namespace)  # noqa: S102 - running the docs is the point
        except Exception as exc:  # re-raised with the block's location
            lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == rel]
            where = f", line {lines[-1]}" if lines else ""
            raise AssertionError(f"{rel}: the python block at line {block.line} failed{where}: "
                                 f"{type(exc).__name__}: {exc}") from exc


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
                "migrating.md", "lora_variants.md"}
    assert expected <= names, expected - names
    for path in DOC_FILES:
        assert python_blocks(path.read_text(encoding="utf-8")), f"{path.name} has no ```python block"


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_doc_code_blocks_run(path: Path, hub_models: dict[str, str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(ROOT))  # so a guide may import examples/...
    run_doc(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), hub_models)
    assert os.getcwd() == str(tmp_path), "a block changed the working directory"


# ------------------------------------------------------------------------------------------ the stand-in is honest
def test_docs_use_no_gated_model() -> None:
    """Every model a guide loads can be downloaded without a licence or a login (the examples would otherwise fail
    for a newcomer, and offline only after the hub client's retries)."""
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in extract_blocks(text):
            for prefix in GATED_PREFIXES:
                assert prefix not in block.code, f"{path.name}: the block at line {block.line} uses a gated {prefix}"


def test_causal_lm_stand_in_mirrors_the_real_tokenizer_and_config(hub_models: dict[str, str]) -> None:
    """What was saved for ``HuggingFaceTB/SmolLM2-135M`` loads through the Auto classes with the real one's special
    tokens: one token for bos/eos/unk, ChatML markers already in the vocabulary, no pad token, no chat template."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub_models[CAUSAL_LM_ID])
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(SMOLLM2_SPECIALS) == [0, 1, 2]
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    assert tokenizer.chat_template is None
    assert tokenizer.padding_side == "right"
    ids = tokenizer("hello world")["input_ids"]
    assert ids and tokenizer.bos_token_id not in ids  # GPT-2 style: no bos added
    config = AutoConfig.from_pretrained(hub_models[CAUSAL_LM_ID])
    assert (config.model_type, config.architectures) == ("llama", ["LlamaForCausalLM"])
    assert config.bos_token_id == config.eos_token_id == 0 and config.pad_token_id is None
    assert config.tie_word_embeddings is True


_PADDING_DOC = """# a guide

```python
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
{fix}batch = tokenizer(["hello world", "the quick brown fox"], return_tensors="pt", padding=True)
```
"""


def test_a_guide_that_pads_without_a_pad_token_fails(hub_models: dict[str, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure a user would see with the real tokenizer (transformers refuses to pad without a pad token) is
    the failure the docs test reports; the fix the guides use makes the same block run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=r"guide\.md: the python block at line 3 failed, line 7: ValueError: "
                                             r"Asking to pad but the tokenizer does not have a padding token"):
        run_doc(_PADDING_DOC.format(fix=""), "guide.md", hub_models)
    fix = "if tokenizer.pad_token is None:\n    tokenizer.pad_token = tokenizer.eos_token\n"
    run_doc(_PADDING_DOC.format(fix=fix), "guide.md", hub_models)
