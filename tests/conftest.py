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


@pytest.fixture(autouse=True)
def baseline_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test its own cache of base-model results (also for the CLI processes it starts): no
    test reads an entry another test wrote, and nothing lands in the user's cache."""
    folder = tmp_path_factory.mktemp("baselines")
    monkeypatch.setenv("MEDASSIST_BASELINE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from medassist.presets import smollm2_folder

    return AutoTokenizer.from_pretrained(smollm2_folder())


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from medassist.presets import qwen_tokenizer

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
    from medassist.presets import _bert_tokenizer

    return _bert_tokenizer()


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def live_server():
    """``with live_server(app) as url:`` runs an ASGI app on uvicorn on a free loopback port
    (in a thread) and stops it afterwards: real sockets, for real clients and disconnects."""
    import contextlib
    import socket
    import threading
    import time

    import uvicorn

    @contextlib.contextmanager
    def serve(app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        from medassist.serving.limits import LingeringClose  # the protocol `medassist serve` runs

        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1,
                                               http=LingeringClose))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()

    return serve
