"""Supervised fine-tuning data: Alpaca / chat records -> token ids + a loss mask.

Input records (a `.json` array or JSON lines, `.jsonl`):
* qa (Alpaca): `{"instruction", "input"?, "output", "system"?}` -> one user turn
  (`instruction`, then a blank line and `input` when present) and one assistant reply `output`.
* chat (OpenAI): `{"messages": [{"role", "content"}, ...], "system"?}` -> any number of turns,
  optional system message(s); tool calls / tool outputs render as in `dsv3.data.chat_template`.

Every record is rendered with the DeepSeek-V3 chat template
`<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>...` and
tokenised piece by piece; the loss mask is 1 on every assistant reply and its end-of-sentence token,
0 on everything else (system, user turns, role tags, tool outputs). The pieces are cut at special
tokens, which the tokenizer never merges across, so the ids equal those of the whole rendered string
(tested). Messages after the last assistant reply carry no target and are dropped.

`dsv3 preprocess --dataset-type qa|chat` writes the result with `write_sft_dataset` as two Megatron
indexed datasets sharing one layout: `PREFIX_input_ids.bin/.idx` (token ids) and
`PREFIX_loss_mask.bin/.idx` (uint8 0/1), both memory-mapped when read (`load_sft_samples`). The
labels of MindFormers' `--dataset_type qa` are `ids` where the mask is 1 and -100 elsewhere
(`SFTSamples.labels`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dsv3.errors import UserError

FORMATS = ("qa", "chat")
IGNORE_INDEX = -100
IDS_SUFFIX, MASK_SUFFIX = "_input_ids", "_loss_mask"


# ---------------------------------------------------------------------------------------- reading
def _lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(where, the surrogate) of the first string (value or key) in `obj` holding a lone UTF-16
    surrogate (JSON allows the escape `\\ud800`; no tokenizer can encode it). Iterative: any depth."""
    stack: list[tuple[str, bool, Any]] = [("", False, obj)]  # (field path, is a key, value)
    while stack:
        field, key, v = stack.pop()
        if isinstance(v, dict):
            for k, x in reversed(v.items()):
                stack += [(f"{field}.{k}" if field else str(k), False, x), (field, True, k)]
        elif isinstance(v, list):
            stack += [(f"{field}[{i}]", False, x) for i, x in reversed(list(enumerate(v)))]
        elif isinstance(v, str) and (bad := next((c for c in v if "\ud800" <= c <= "\udfff"), None)) is not None:
            where = f"field {field}" if field else "the record"
            return (f"a key of {where}" if key else where), bad
    return None


def _decoded(decode: Callable[[], Any], path: Path, line: int, line_of: Callable[[int], int]):
    """`decode()`, a JSON decode of the record starting on `line` (`line_of` maps an error position
    to its line), with nesting beyond the parser's depth and lone surrogates refused in one line each."""
    try:
        out = decode()
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {line_of(e.pos)}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: line {line}: JSON nested too deeply (over {sys.getrecursionlimit()} levels)") from None
    if (bad := _lone_surrogate(out[0] if isinstance(out, tuple) else out)) is not None:
        raise UserError(f"{path}: line {line}: {bad[0]} holds a lone surrogate ({ascii(bad[1])}), which is not valid Unicode")
    return out


def _json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            raise UserError(f"{path}: line {text.count(chr(10), 0, n) + 1}: JSON array is not closed")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        obj, i = _decoded(lambda: dec.raw_decode(text, i), path, line, lambda pos: text.count("\n", 0, pos) + 1)
        yield line, obj


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a `.json` array or a JSON-lines file (blank lines skipped; a UTF-8
    byte-order mark at the start skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: SFT data file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    if text.lstrip().startswith("["):
        yield from _json_array(text, path)
        return
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        yield no, _decoded(lambda: json.loads(line), path, no, lambda pos: no)


def detect_format(record: Any) -> str | None:
    if isinstance(record, dict):
        if "messages" in record:
            return "chat"
        if "instruction" in record or "output" in record:
            return "qa"
    return None


def _text(rec: dict, key: str, where: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        got = "missing" if key not in rec else f"a {type(v).__name__}, not a string"
        raise UserError(f"{where}: field {key!r} is {got}")
    return v


def to_messages(rec: Any, fmt: str, where: str) -> list[dict[str, Any]]:
    """A record of format `fmt` as chat messages (checked: fields present, replies non-empty)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    system = _text(rec, "system", where, required=False)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if fmt == "qa":
        instruction, extra = _text(rec, "instruction", where), _text(rec, "input", where, required=False)
        output = _text(rec, "output", where)
        if not instruction.strip():
            raise UserError(f"{where}: field 'instruction' is empty")
        if not output.strip():
            raise UserError(f"{where}: field 'output' is empty (no reply to train on)")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    turns = rec.get("messages")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: field 'messages' is {'missing' if 'messages' not in rec else 'not a non-empty list'}")
    for i, m in enumerate(turns):
        f = f"{where}: field messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"{f}: expected an object with a string 'role'")
        if m["role"] == "assistant" and not m.get("tool_calls"):
            c = m.get("content")
            if c is None or (isinstance(c, str) and not c.strip()) or c == []:
                raise UserError(f"{f}.content: empty assistant reply (nothing to train on)")
    if not any(m["role"] == "assistant" for m in turns):
        raise UserError(f"{where}: field 'messages' has no assistant reply (nothing to train on)")
    return msgs + list(turns)


# ---------------------------------------------------------------------------------------- encoding
def segments(messages: list[dict[str, Any]], bos: str, eos: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: prompts False, each assistant reply + EOS True."""
    from dsv3.data.chat_template import render_chat

    out: list[tuple[str, bool]] = []
    done = ""
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(messages[:j], add_generation_prompt=True, bos_token=bos, eos_token=eos)
        full = render_chat(messages[: j + 1], add_generation_prompt=False, bos_token=bos, eos_token=eos)
        if not prompt.startswith(done) or not full.startswith(prompt) or not full.endswith(eos):
            raise UserError(f"messages[{j}]: the chat template does not render this turn as prompt + reply")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return out


def encode_messages(tok, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], loss mask uint8 [n]) of one conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments(messages, tok.bos_token, tok.eos_token):
        piece = tok.encode(text) if text else []
        ids += piece
        mask += [int(trained)] * len(piece)
    return np.asarray(ids, np.int64), np.asarray(mask, np.uint8)


def encode_file(path: str | os.PathLike, tok, fmt: str = "auto") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode every record of an Alpaca (qa) or chat file; errors name the file, line and field."""
    if fmt not in ("auto", *FORMATS):
        raise UserError(f"SFT format {fmt!r}: expected auto, qa or chat")
    for no, rec in read_records(path):
        where = f"{path}: line {no}"
        kind = detect_format(rec) if fmt == "auto" else fmt
        if kind is None:
            raise UserError(f"{where}: neither an Alpaca record (instruction/input/output) nor a chat record (messages)")
        msgs = to_messages(rec, kind, where)
        try:
            yield encode_messages(tok, msgs)
        except UserError as e:
            raise UserError(f"{where}: cannot render with the chat template: {e}") from None


# ---------------------------------------------------------------------------------------- storage
@dataclass
class SFTSamples:
    """Encoded samples: `ids(i)` / `mask(i)` arrays (memory-mapped when read from disk)."""

    _ids: Any
    _mask: Any
    source: str

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self, i: int) -> np.ndarray:
        return self._ids[i]

    def mask(self, i: int) -> np.ndarray:
        return self._mask[i]

    def labels(self, i: int) -> np.ndarray:
        """MindFormers-style labels: the ids where trained, -100 elsewhere."""
        return np.where(self.mask(i) > 0, self.ids(i).astype(np.int64), IGNORE_INDEX)


def is_raw_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix in (".json", ".jsonl")


def load_sft_samples(path: str | os.PathLike, tok=None, fmt: str = "auto") -> SFTSamples:
    """A `dsv3 preprocess --dataset-type` prefix (memory-mapped) or a .json/.jsonl file (encoded now)."""
    from dsv3.data.indexed_dataset import IndexedDataset, exists

    p = os.fspath(path)
    if is_raw_file(p):
        if tok is None:
            raise UserError(f"{p}: a raw SFT file needs a tokenizer (data.tokenizer, --tokenizer or the checkpoint's)")
        ids, mask = [], []
        for i, m in encode_file(p, tok, fmt):
            ids.append(i)
            mask.append(m)
        if not ids:
            raise UserError(f"{p}: no SFT records")
        return SFTSamples(ids, mask, p)
    if os.path.isdir(p) and any(".mindrecord" in f for f in os.listdir(p)):
        raise UserError(f"{p}: holds MindRecord files, which dsv3 does not read; convert the source JSON with `dsv3 preprocess "
                        f"--dataset-type qa --input FILE.json --output-prefix {os.path.join(p, 'sft')}` and use {os.path.join(p, 'sft')}")
    if not exists(p + IDS_SUFFIX) or not exists(p + MASK_SUFFIX):
        raise UserError(f"{p}: neither a .json/.jsonl file nor a tokenised SFT prefix ({p}{IDS_SUFFIX}.bin/.idx and "
                        f"{p}{MASK_SUFFIX}.bin/.idx, written by `dsv3 preprocess --dataset-type qa|chat`)")
    ids, mask = IndexedDataset(p + IDS_SUFFIX), IndexedDataset(p + MASK_SUFFIX)
    if not np.array_equal(ids.sequence_lengths, mask.sequence_lengths):
        raise UserError(f"{p}: {p}{IDS_SUFFIX} and {p}{MASK_SUFFIX} have different sample lengths (mixed runs?)")
    if len(ids) == 0:
        raise UserError(f"{p}: no SFT samples")
    return SFTSamples(ids, mask, p)


@dataclass
class SFTWriteResult:
    prefix: str
    samples: int
    tokens: int
    trained_tokens: int


def write_sft_dataset(input: str | os.PathLike, output_prefix: str, tok, fmt: str = "auto",
                      vocab_size: int | None = None) -> SFTWriteResult:
    """Encode `input` and write PREFIX_input_ids / PREFIX_loss_mask .bin/.idx; nothing is renamed into
    place unless every record encoded (a bad record leaves no PREFIX_* files)."""
    from dsv3.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: output directory does not exist (--output-prefix)")
    d, base = os.path.split(output_prefix)
    tmp = {s: os.path.join(d, f".{base}{s}.tmp-{os.getpid()}") for s in (IDS_SUFFIX, MASK_SUFFIX)}
    builders = {IDS_SUFFIX: IndexedDatasetBuilder(tmp[IDS_SUFFIX] + ".bin", optimal_dtype(vocab_size or tok.vocab_size)),
                MASK_SUFFIX: IndexedDatasetBuilder(tmp[MASK_SUFFIX] + ".bin", np.uint8)}
    n = tokens = trained = 0
    try:
        for ids, mask in encode_file(input, tok, fmt):
            builders[IDS_SUFFIX].add_document(ids, [len(ids)])
            builders[MASK_SUFFIX].add_document(mask, [len(mask)])
            n, tokens, trained = n + 1, tokens + len(ids), trained + int(mask.sum())
        if n == 0:
            raise UserError(f"{input}: no SFT records")
        for s, b in builders.items():
            b.finalize(tmp[s] + ".idx")
        for s in builders:  # .bin first, .idx last: a dataset is complete once its .idx appears
            os.replace(tmp[s] + ".bin", output_prefix + s + ".bin")
            os.replace(tmp[s] + ".idx", output_prefix + s + ".idx")
    except BaseException:
        for b in builders.values():
            b._bin.close()
        for t in tmp.values():
            for ext in (".bin", ".idx"):
                if os.path.exists(t + ext):
                    os.unlink(t + ext)
        raise
    return SFTWriteResult(output_prefix, n, tokens, trained)


def run_preprocess(args) -> int:
    """`dsv3 preprocess --dataset-type qa|chat`: the SFT branch of the verb."""
    from dsv3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.vocab_file)
    if tok.vocab_size > args.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} ids but the model vocab_size is {args.vocab_size} (--vocab-size)")
    r = write_sft_dataset(args.input, args.output_prefix, tok, args.dataset_type, args.vocab_size)
    print(f"{r.prefix}{IDS_SUFFIX}.bin/.idx + {r.prefix}{MASK_SUFFIX}.bin/.idx: {r.samples} samples, {r.tokens} tokens "
          f"({r.trained_tokens} in replies, trained); data.sft.path: {r.prefix}", file=sys.stdout)
    return 0
