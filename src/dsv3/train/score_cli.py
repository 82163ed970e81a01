"""`dsv3 score`: teacher-forced logprobs of prompt + completion pairs, equal to the server's (`dsv3.train.score`).

    dsv3 score MODEL_DIR --input pairs.jsonl --output logprobs.jsonl

Each input line is a JSON object with the prompt as "prompt" (text, encoded with BOS as the engine does)
or "prompt_token_ids", and the completion as "completion" (text, encoded without BOS) or
"completion_token_ids" (what the server returned: use the ids, a text may tokenize differently). Each
output line: {"prompt_token_ids", "completion_token_ids", "prompt_logprobs" (None first, as the
server's prompt_logprobs), "logprobs" (one per completion token)}: the same floats as
`dsv3 serve --batch-invariant` (or `LLM(..., batch_invariant=True)`) reports for those tokens, with the
same --dtype and --threads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from dsv3.errors import UserError

MAX_LINES = 100_000
"""Most input lines (pairs) one call scores."""
MAX_LINE_BYTES = 16 << 20
"""Longest input line read (a longer one is an error, never read whole into memory)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="HF-format or dsv3 model directory (config.json + safetensors)")
    p.add_argument("--input", required=True, help="JSONL of {prompt | prompt_token_ids, completion | completion_token_ids}")
    p.add_argument("--output", required=True, help="JSONL written here (temp name, then renamed)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / directory (default: the model directory's)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (the server's --dtype)")
    p.add_argument("--max-lines", type=int, default=MAX_LINES, help=f"most input lines (default {MAX_LINES})")


def _ids(rec: dict, key: str, where: str, encode, vocab: int, bos: bool) -> list[int]:
    """The ids of field `key` (or `key`_token_ids); ValueError naming the field on anything else."""
    if f"{key}_token_ids" in rec:
        ids = rec[f"{key}_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise UserError(f"{where}: {key}_token_ids must be a list of integers in [0, {vocab})")
        return ids
    text = rec.get(key)
    if not isinstance(text, str):
        raise UserError(f"{where}: give {key!r} (a string) or {key}_token_ids (a list of ids)")
    if encode is None:
        raise UserError(f"{where}: {key!r} is text but the model has no tokenizer: give {key}_token_ids or --tokenizer")
    return encode(text, bos)


def read_pairs(path: Path, encode, vocab: int, max_len: int, max_lines: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per line of `path`; UserError naming the line and field otherwise."""
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    pairs = []
    with path.open("rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path} line {n}"
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(f"{where}: longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            if len(pairs) >= max_lines:
                raise UserError(f"{path}: more than --max-lines {max_lines} lines")
            try:
                rec = json.loads(raw.decode("utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            prompt = _ids(rec, "prompt", where, encode, vocab, True)
            completion = _ids(rec, "completion", where, encode, vocab, False)
            if not prompt or len(prompt) + len(completion) < 2 or len(prompt) + len(completion) > max_len:
                raise UserError(f"{where}: prompt + completion must be 2..{max_len} tokens with a non-empty prompt, "
                                f"got {len(prompt)} + {len(completion)}")
            pairs.append((prompt, completion))
    return pairs


def run(args) -> int:
    import torch

    from dsv3 import threads
    from dsv3.infer.loading import default_device, encode_text, load_model, load_tokenizer_for, resolve_dtype
    from dsv3.train.score import score_logprobs

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    if args.max_lines < 1:
        raise UserError(f"--max-lines must be >= 1, got {args.max_lines}")
    device = default_device()
    try:
        dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, device)
    except ValueError as e:
        raise UserError(f"--dtype: {e}") from None
    tokenizer = load_tokenizer_for(model_dir, args.tokenizer)
    encode = (lambda text, bos: encode_text(tokenizer, text, bos)) if tokenizer is not None else None
    model = load_model(model_dir, dtype, device)  # as the engine loads it (no MTP: scoring is the main model's)
    cfg = model.config
    pairs = read_pairs(Path(args.input), encode, cfg.vocab_size, cfg.max_position_embeddings, args.max_lines)
    model = model.to(device=device, dtype=dtype).eval()
    if threads.current() is not None:
        print(threads.current().line(), flush=True)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), tmp.open("w", encoding="utf-8") as f:
            for prompt, completion in pairs:
                lp = score_logprobs(model, [prompt + completion])[0].tolist()
                rec: dict[str, Any] = {"prompt_token_ids": prompt, "completion_token_ids": completion,
                                       "prompt_logprobs": [None] + lp[: len(prompt) - 1], "logprobs": lp[len(prompt) - 1 :]}
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"scored {len(pairs)} sequences -> {out}")
    return 0
