"""The fenced code blocks of README.md and docs/**/*.md, for `test_doc_examples.py`.

A block is a ```LANG fence; shell (bash, shell, sh) and python blocks are examples to run, the
other languages (text, yaml, jsonl) are shown, not run. An HTML comment on the line right above a
fence, `<!-- doc-test: skip REASON -->`, marks an example that cannot run in CI (a cluster, a 671B
checkpoint, minutes of work): the test reports it as skipped with that reason."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_LANGS = {"bash": "bash", "shell": "bash", "sh": "bash", "python": "python"}
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of one markdown file, in order; a malformed directive or an unclosed fence
    is a ValueError naming the line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: code fence never closed")
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", _skip_reason(path, lines, start)))
        i += 1
    return out


def _skip_reason(path: Path, lines: list[str], fence: int) -> str | None:
    if fence == 0 or "doc-test" not in lines[fence - 1]:
        return None
    m = _DIRECTIVE.match(lines[fence - 1])
    if not m or m.group(1) != "skip" or not m.group(2):
        raise ValueError(f"{path}:{fence}: expected <!-- doc-test: skip REASON -->, got {lines[fence - 1].strip()!r}")
    return m.group(2)


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in blocks(f)]
