"""Shared fixtures: real tokenizers of three kinds, tiny models, the sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "medassist" / "resources" / "sample_medical_qa.csv"
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad.csv"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from medassist.models import smollm2_folder

    return AutoTokenizer.from_pretrained(smollm2_folder())


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from medassist.models import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="session")
def qwen_base_tokenizer(qwen_tokenizer):
    """The Qwen vocabulary as a *base* model sees it: no chat template, EOS <|endoftext|>."""
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"
    return tok


@pytest.fixture(scope="session")
def bert_tokenizer():
    from medassist.models import _bert_tokenizer

    return _bert_tokenizer()


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE
