"""Fixtures for the server tests: a tiny random DeepSeek-V3 checkpoint with the real tokenizer, and a
real `dsv3 serve` app (uvicorn in a thread on 127.0.0.1, a free port) around one engine. Helpers the
tests import live in `serve_helpers.py` (a uniquely named module: several test folders have a conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import API_KEY, MODEL_NAME, ServerThread, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from dsv3.infer.engine import LLMEngine

    return LLMEngine.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", max_num_seqs=8)


@pytest.fixture(scope="module")
def server(engine, tiny_model_dir):
    from dsv3.serve.app import build_app

    app = build_app(engine, MODEL_NAME, api_key=API_KEY)
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)
