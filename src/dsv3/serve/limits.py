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
- `max_requests` (256): engine requests one call may start, n x prompts (128 x 256 = 32,768 starved
  every other client for minutes).
- `max_stop` (64) stop strings and stop token ids each, `max_stop_chars` (4096) characters of stop
  strings in all (every stop string is searched in every new piece of text: 4 x 300,000 of them
  slowed other streams 40x).
- `max_tools` (128, OpenAI's limit): functions in `tools`.
- `max_guided_bytes` (64 KiB): a structured-output constraint's text (the JSON schema, compact; the
  regex; the choices in all); `max_schema_nodes` (5000, as OpenAI's 5000 properties): JSON values
  in a schema; `max_guided_choices` (1000, OpenAI's enum limit): items of `guided_choice`. A regex
  (`guided_regex`, a schema's `pattern`) may nest groups at most `max_json_depth` deep. Compiling
  is linear-ish in these sizes (an anyOf of 1200 objects: 0.6 s, off the event loop); an anyOf of
  10,000 took minutes.
- `header_timeout` (10 s): a connection must send complete request headers this soon after it
  opens (or after the first byte of its next request): `connection.py`.
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
    max_requests: int = 256
    max_stop: int = 64
    max_stop_chars: int = 4096
    max_tools: int = 128
    max_guided_bytes: int = 64 << 10
    max_schema_nodes: int = 5000
    max_guided_choices: int = 1000
    header_timeout: int = 10

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < (0 if name == "max_logprobs" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= "
                                f"{0 if name == 'max_logprobs' else 1}, got {value!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerLimits":
        return cls(**{name: getattr(args, name) for name in vars(cls()) if hasattr(args, name)})


_FLAGS = {  # field -> help (the default is appended)
    "max_request_bytes": "largest request body accepted; larger ones get 413",
    "max_logprobs": "most top logprobs per token a request may ask for (as vLLM)",
    "max_n": "most samples per prompt (as OpenAI)",
    "max_prompts": "most prompts in one /v1/completions request",
    "max_requests": "most engine requests (n x prompts) one API call may start",
    "max_stop": "most stop strings, and most stop_token_ids, per request",
    "max_stop_chars": "most characters of stop strings in all per request",
    "max_tools": "most functions in a request's tools (as OpenAI)",
    "max_guided_bytes": "largest structured-output constraint (schema, regex or choices), in bytes",
    "max_schema_nodes": "most JSON values in a structured-output schema",
    "max_guided_choices": "most items in guided_choice",
    "header_timeout": "seconds a connection may take to send its request headers",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerLimits()
    for name, help_ in _FLAGS.items():
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=f"{help_} (default {default})")
