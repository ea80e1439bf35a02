"""Shared pytest setup: single-threaded torch, offline Hugging Face Hub, a `seed` fixture."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Must happen before anything imports transformers / huggingface_hub / tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# torch.compile tests get an inductor cache of their own (removed at exit): kernels cached by other runs (another
# torch, another vector ISA such as ATEN_CPU_CAPABILITY=avx2 emulation) can otherwise be reused and misbehave.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="peftkit-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

# 2-core machines + pytest-xdist: more than one intra-op thread per worker makes things much slower.
torch.set_num_threads(1)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


# ---------------------------------------------------------------------------------------------------- CLI tests
# Tiny models and data files saved once per test module, for the command-line tests (tests/test_cli*.py; a module
# defining a fixture of the same name uses its own).
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def llama_dir(work):
    """A tiny Llama and a byte-level BPE tokenizer saved together (a local "model id")."""
    from models import tiny_llama, tiny_tokenizer

    path = work / "llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer("bpe").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(work):
    """A tiny BERT classifier and a word-level tokenizer saved together."""
    from models import tiny_bert, tiny_tokenizer

    path = work / "bert"
    tiny_bert("SEQ_CLS").save_pretrained(path)
    tiny_tokenizer("wordlevel").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_data(work):
    from cli_fixtures import write_jsonl
    from models import _CORPUS

    return write_jsonl(work / "lm.jsonl", [{"text": t} for t in _CORPUS[:4]])


@pytest.fixture(scope="module")
def cls_data(work):
    from cli_fixtures import write_jsonl
    from models import _CORPUS

    rows = [{"text": t, "label": "pos" if "great" in t or "hello" in t else "neg"} for t in _CORPUS[:7]]
    return write_jsonl(work / "cls.jsonl", rows)
