"""Per-request limits of `dsv3 serve`, in one place (one dataclass, its CLI flags, its checks).

A single client must never be able to hurt the others, so everything a request can make the
server allocate or compute is bounded before any of it is done:

- `max_request_bytes` (4 MiB): the body is read by the ASGI middleware (`app.py`) up to this many
  bytes, then 413. A full 163,840-token context as token ids is about 1.1 MB of JSON ("123456,"),
  as text about 0.7 MB (or 1.5 MB when every CJK character is JSON-escaped as `\\uXXXX`), so 4 MiB
  carries any prompt that fits the largest DeepSeek-V3 context, with room to spare.
- `max_json_depth` (64): deeper JSON is refused before validation (a chat request is about 5 deep,
  a tool's JSON schema rarely 20).
- `max_n` (128, OpenAI's limit): samples per prompt.
- `max_prompts` (256): prompts in one /v1/completions request (n x prompts engine requests).
- `max_logprobs` (20, as vLLM's `--max-logprobs`): top alternatives per token, for generated
  tokens (`logprobs` / `top_logprobs`) and prompt tokens (`echo` with `logprobs`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dsv3.errors import UserError


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 4 << 20
    max_json_depth: int = 64
    max_n: int = 128
    max_prompts: int = 256
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < (0 if name == "max_logprobs" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= "
                                f"{0 if name == 'max_logprobs' else 1}, got {value!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerLimits":
        return cls(max_request_bytes=args.max_request_bytes, max_n=args.max_n, max_prompts=args.max_prompts,
                   max_logprobs=args.max_logprobs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerLimits()
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body accepted; larger ones get 413 (default {d.max_request_bytes})")
    p.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help=f"most top logprobs per token a request may ask for (default {d.max_logprobs}, as vLLM)")
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"most samples per prompt (default {d.max_n}, as OpenAI)")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help=f"most prompts in one /v1/completions request (default {d.max_prompts})")
