"""Shared pytest setup: single-threaded torch, offline Hugging Face Hub, a `seed` fixture."""

import os

import pytest
import torch

# Must happen before anything imports transformers / huggingface_hub / tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# 2-core machines + pytest-xdist: more than one intra-op thread per worker makes things much slower.
torch.set_num_threads(1)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
