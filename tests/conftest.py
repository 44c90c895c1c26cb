"""Shared fixtures: tiny in-process models and tokenizers, never a download."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from neftune.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(vocab_size=len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random model + tokenizer directory (loadable with from_pretrained)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def _single_thread_torch():
    torch.set_num_threads(1)
    yield
