"""Input and temp-file hygiene of `dsv3 preprocess`: reading the input, streamed lines, bounded
document pieces, one-line errors, and no `.PREFIX.tmp-PID.*` file left behind.

* `read_documents(path, fmt)` yields (line number, raw item): WikiText paragraphs (`fmt`
  "wikitext", the whole file read and cleaned) or JSON lines (streamed); `input_format` picks the
  format from the file name. Non-UTF-8 input or an empty file is a one-line UserError.
* `stream_lines(path)` yields (line number, bytes) one line at a time (`.xz` decompressed on the
  fly): memory holds one line, not the file. A truncated or corrupt `.xz` is a one-line UserError
  naming the file and the line reached.
* `iter_pieces(text, max_chars)` (`split_long`: as a list) cuts a document longer than `max_chars` characters into pieces of
  at most `max_chars`, each cut just before a single space that follows a non-space character and
  precedes one. The DeepSeek-V3 pre-tokenizer always starts a pre-token at such a space (its
  patterns can begin with a space but never contain one after another character), so encoding the
  pieces and concatenating the ids gives exactly the ids of the whole document; the tokenizer's
  memory is bounded by the piece. A piece with no such space in it (e.g. a long run of CJK text)
  is cut at `max_chars` hard; only there may the ids differ from an unsplit encode.
* The bound: peak memory is about the tokenizer itself + a few bytes per character of the longest
  input line (its bytes, its text, the JSON value, and its ids as int32 arrays, never as Python
  lists) + per worker one work item and the tokenizer's working set for one piece (~15 MB at the
  default 100,000 characters), whatever the file or document size (docs/data.md).
* `text_problem(text)` finds lone surrogates (`"\\ud800"` in JSON), which are not Unicode text.
* `sigterm_exits()` turns SIGTERM into SystemExit so the caller's cleanup runs;
  `remove_stale_temps(prefix)` deletes temp files of earlier runs whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from dsv3.errors import UserError

MAX_DOC_CHARS = 100_000
"""Default longest piece (characters) handed to the tokenizer at once (`--max-doc-chars`)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_CUT = re.compile(r"(?<=\S) (?=\S)")  # a single space between two non-space characters


def stream_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline), decompressing `.xz` on the fly."""
    import lzma

    line_no = 0
    try:
        with (lzma.open(path, "rb") if path.suffix == ".xz" else open(path, "rb")) as f:
            for line_no, line in enumerate(f, start=1):
                yield line_no, line.rstrip(b"\r\n")
    except (lzma.LZMAError, EOFError) as e:
        raise UserError(f"{path}: truncated or corrupt .xz after line {line_no} ({e})") from None


def iter_pieces(text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """`text` as pieces of at most `max_chars` characters, cut before a space where one allows it
    (see the module docstring), one at a time; a text within the bound comes whole."""
    start = 0
    while len(text) - start > max_chars:
        window_end = start + max_chars
        cut = None
        for m in _CUT.finditer(text, start + 1, window_end + 1):
            cut = m.start()  # the last allowed space inside the window
        if cut is None or cut <= start:
            cut = window_end
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """The pieces of `iter_pieces` as a list."""
    return list(iter_pieces(text, max_chars))


def encode_bounded(tok, docs: list[str], max_chars: int) -> list[np.ndarray]:
    """The ids of each document as an int32 array: `tok.encode_batch(docs)`, with documents longer
    than `max_chars` encoded piece by piece, each piece's ids made an array at once (a Python list
    of ids costs ~36 bytes a token, an array 4), so the tokenizer never sees more than `max_chars`
    characters and a long document costs ~2 arrays of its ids, not lists."""
    if all(len(d) <= max_chars for d in docs):
        return [np.asarray(ids, np.int32) for ids in tok.encode_batch(docs)]
    out = []
    for d in docs:
        parts = [np.asarray(tok.encode_batch([piece])[0], np.int32) for piece in iter_pieces(d, max_chars)]
        out.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return out


def ordered_bounded(pool, fn: Callable, work: Iterable, window: int) -> Iterator:
    """`pool.imap(fn, work)` with at most `window` items in flight (imap reads all of `work` ahead
    into its task queue, i.e. the whole input into memory)."""
    pending: deque = deque()
    for item in work:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenised (a lone surrogate), or None."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"holds a lone surrogate \\u{ord(m.group()):04x} at character {m.start()} (not valid Unicode text)"


def sigterm_exits() -> Callable[[], None]:
    """Make SIGTERM raise SystemExit(143) (main thread only), so the caller's `except`/`finally`
    blocks remove temporary files. Returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def reset_sigterm() -> None:
    """In a worker process: the default SIGTERM (the pool terminates workers with it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def temp_prefix(final_prefix: str, pid: int | None = None) -> str:
    """The hidden temporary name a dataset is written under: `DIR/.BASE.tmp-PID`."""
    d, base = os.path.split(final_prefix)
    return os.path.join(d, f".{base}.tmp-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(final_prefix: str) -> list[str]:
    """Delete `.BASE.tmp-PID.bin/.idx` left by runs whose process no longer exists (killed with
    SIGKILL, or by a power cut). Files of a live process are kept. Returns the removed paths."""
    d, base = os.path.split(final_prefix)
    removed = []
    for p in glob.glob(os.path.join(glob.escape(d or "."), f".{glob.escape(base)}.tmp-*")):
        m = re.fullmatch(re.escape(f".{base}.tmp-") + r"(\d+)\.(bin|idx)", os.path.basename(p))
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Reading input (WikiText paragraphs or JSON lines)


def _decode_utf8(data: bytes, path: str, line_no: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if line_no is None:
            line_no = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} on line {line_no})") from None


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        import lzma

        try:
            with lzma.open(path, "rb") as f:
                return f.read()
        except (lzma.LZMAError, EOFError) as e:  # EOFError: truncated stream
            raise UserError(f"{path}: truncated or corrupt .xz ({e})") from None
    return path.read_bytes()


def input_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name[:-3] if path.name.endswith(".xz") else path.name
    return "jsonl" if name.endswith((".json", ".jsonl")) else "wikitext"


def read_documents(path: Path, fmt: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, raw item): WikiText paragraphs (already cleaned), or raw JSON lines
    (streamed: one line in memory at a time)."""
    from dsv3.data.wikitext import wikitext_documents

    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    if fmt == "wikitext":
        data = _read_bytes(path)
        if not data.strip():
            raise UserError(f"{path}: input is empty")
        for i, doc in enumerate(wikitext_documents(_decode_utf8(data, str(path)))):
            yield i, doc
        return
    empty = True
    for i, line in stream_lines(path):
        if line.strip():
            empty = False
            yield i, _decode_utf8(line, str(path), i)
    if empty:
        raise UserError(f"{path}: input is empty")
