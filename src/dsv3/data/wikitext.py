"""WikiText-2: find (or fetch) the files, and turn `wiki.*.tokens` into paragraph documents.

The seed guide trains on WikiText-2 (`wiki.train.tokens` from `wikitext-2-v1.zip`). MindSpore's
`wikitext_to_bin.py` first undoes WikiText's tokenisation artefacts (` @-@ ` -> `-`, spaces before
punctuation, ...), splits the text on blank lines and drops headings (paragraphs starting with
`=`); each remaining paragraph is one document. `wikitext_documents` does the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

from dsv3.errors import UserError

# sha256 of the decompressed official files (shared/data/README.md; the same files are in
# wikitext-2-v1.zip, checked there against GluonNLP's published SHA-1s).
SHA256 = {
    "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}
# Public copies of wikitext-2-v1.zip: the one the seed guide links, then the author's mirror.
URLS = (
    "https://ascend-repo-modelzoo.obs.cn-east-2.myhuaweicloud.com/MindFormers/dataset/wikitext-2/wikitext-2-v1.zip",
    "https://wikitext.smerity.com/wikitext-2-v1.zip",
)
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsv3" / "wikitext-2"


def _has_train(d: Path) -> bool:
    return (d / "wiki.train.tokens").is_file() or (d / "wiki.train.tokens.xz").is_file()


def find_wikitext(path: str | os.PathLike | None = None, urls: tuple[str, ...] = URLS,
                  cache_dir: Path | None = None) -> Path:
    """Directory holding `wiki.train.tokens[.xz]` (and `wiki.valid.tokens[.xz]`).

    Looks at `path`, then `$DSV3_DATA_DIR` (the folder itself or its `wikitext-2/`; when set, it
    must hold the files: a missing folder is an error, not skipped), then the download cache;
    otherwise downloads `wikitext-2-v1.zip` from `urls`, checks each file's sha256 and keeps it in
    the cache. Offline with nothing local -> UserError saying what to provide.
    """
    if path is not None:
        p = Path(path)
        for cand in (p, p / "wikitext-2"):
            if cand.is_dir() and _has_train(cand):
                return cand
        raise UserError(f"{p}: no wiki.train.tokens (or wiki.train.tokens.xz) found there")
    env = os.environ.get("DSV3_DATA_DIR")
    if env:
        for cand in (Path(env) / "wikitext-2", Path(env)):
            if cand.is_dir() and _has_train(cand):
                return cand
        what = "no wiki.train.tokens[.xz] there or in its wikitext-2/" if Path(env).is_dir() else "no such folder"
        raise UserError(f"DSV3_DATA_DIR={env}: {what} (point it to the folder holding wikitext-2/, or unset it)")
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    if all((cache / n).is_file() for n in SHA256):
        return cache
    return download_wikitext(cache, urls)


def download_wikitext(dest: Path, urls: tuple[str, ...] = URLS) -> Path:
    """Download wikitext-2-v1.zip, verify train/valid sha256, write them into `dest` atomically."""
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                blob = r.read()
        except (OSError, ValueError) as e:  # URLError is an OSError
            errors.append(f"{url}: {e}")
            continue
        try:
            zf = zipfile.ZipFile(io.BytesIO(blob))
        except zipfile.BadZipFile:
            errors.append(f"{url}: not a zip file")
            continue
        members = {Path(n).name: n for n in zf.namelist()}
        files = {}
        for name, want in SHA256.items():
            if name not in members:
                raise UserError(f"{url}: archive has no {name}")
            data = zf.read(members[name])
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise UserError(f"{url}: {name} sha256 {got} does not match the official {want}")
            files[name] = data
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest / name)
        return dest
    raise UserError(
        "WikiText-2 not found and could not be downloaded (" + "; ".join(errors) + "). Provide a folder with "
        "wiki.train.tokens / wiki.valid.tokens (from wikitext-2-v1.zip) as an argument or via DSV3_DATA_DIR"
    )


def open_text(path: str | os.PathLike):
    """Open a UTF-8 text file, transparently decompressing `.xz`. Strict decoding: bad bytes raise."""
    p = Path(path)
    if p.suffix == ".xz":
        return lzma.open(p, "rt", encoding="utf-8", errors="strict", newline="")
    return open(p, "r", encoding="utf-8", errors="strict", newline="")


# (old, new) plain replacements of the WikiText clean-up, in the order they are applied.
_NUMBER_AND_PUNCT = [
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" .", "."), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
]
# Spaces just inside paired brackets and quotes are removed: "( x )" -> "(x)".
_PAIRS = [("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")]
_PAIR_RES = [
    (re.compile(re.escape(a) + r"\s*([^" + re.escape(b) + r"]*?)\s*" + re.escape(b)), a + r"\1" + b) for a, b in _PAIRS
]
_TAIL = [
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
    (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
]


def clean(text: str) -> str:
    """Undo WikiText's tokenisation artefacts the way the seed's `wikitext_clean` does."""
    text = text.replace("s '", "s'")
    # The seed also rewrites the literal "/' <digit>/" (a regex written with slashes); kept for parity.
    text = re.sub(r"/' [0-9]/", "/'[0-9]/", text)
    for old, new in _NUMBER_AND_PUNCT:
        text = text.replace(old, new)
    for pattern, repl in _PAIR_RES:
        text = pattern.sub(repl, text)
    for old, new in _TAIL:
        text = text.replace(old, new)
    return text


def wikitext_documents(text: str) -> Iterator[str]:
    """Paragraph documents of a WikiText file: cleaned, split on blank lines, headings dropped."""
    for para in clean(text).split("\n\n"):
        if para and not para.strip().startswith("="):
            yield para


def read_wikitext_documents(path: str | os.PathLike) -> list[str]:
    with open_text(path) as f:
        return list(wikitext_documents(f.read()))


def wikitext_to_jsonl(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write the paragraph documents as JSON lines `{"text": ..., "id": "<n>"}` (the seed script's
    intermediate file; Megatron's own `preprocess_data.py` reads it). Returns the number of lines;
    `dst` appears only when complete."""
    dst = Path(dst)
    docs = read_wikitext_documents(src)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, doc in enumerate(docs):
                f.write(json.dumps({"text": doc, "id": str(i)}) + "\n")
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(docs)
