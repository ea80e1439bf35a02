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
