"""Every shell and Python example of README.md and docs/**/*.md runs as written.

Each block runs from the checkout's root, as a reader pastes it there: shell blocks in
`bash -e -o pipefail`, Python blocks as a script, with `dsv3` and `python` on PATH being this
interpreter (what the console script of `pip install -e .` runs). The blocks of one file run in
document order and share what earlier ones started (the "Try it" server of docs/serving.md serves
the benchmarks after it); every process a file started is stopped when its last block is done.
The model the examples name, `/tmp/dsv3-tiny`, is written first by the command the docs give for it.
A block must leave no new file in the checkout (examples write to /tmp or to a folder they name).
Blocks marked `<!-- doc-test: skip REASON -->` are reported as skipped with their reason."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from doc_blocks import REPO, RUN_LANGS, Block, all_blocks, doc_files

BLOCKS = [b for b in all_blocks() if b.runs]
TINY = Path("/tmp/dsv3-tiny")
MAKE_TINY = ["bench/make_random_model.py", "--config", "configs/tiny.yaml", "--out", str(TINY)]
SERVER_PORT = 8000  # `dsv3 serve`'s default, which the examples use


class DocRunner:
    """Runs blocks, keeps the process groups they leave running until their file is done."""

    def __init__(self, bin_dir: Path):
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
        self.file: Path | None = None
        self.groups: list[int] = []
        self.server_started = False

    def enter(self, path: Path) -> None:
        if path != self.file:
            self.stop_all()
            self.file, self.server_started = path, False

    def stop_all(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                    alive.append(pgid)
                except ProcessLookupError:
                    pass
            self.groups = alive
            if sig == signal.SIGTERM and alive:
                time.sleep(2)  # a server's graceful shutdown
        self.groups = []

    def run(self, block: Block, tmp: Path, timeout: float = 600) -> tuple[int, str]:
        """(exit status, output) of one block. The output goes to a file, not a pipe: a server the
        block leaves running keeps its end of a pipe open, and nothing would ever read EOF."""
        script = tmp / ("block.sh" if RUN_LANGS[block.lang] == "bash" else "block.py")
        script.write_text(block.code, encoding="utf-8")
        argv = ["bash", "-e", "-o", "pipefail", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
        log = tmp / "output.txt"
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc.pid)  # its own process group: background jobs of the block stay in it
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{block.id}: still running after {timeout:.0f} s; output:\n{log.read_text(errors='replace')[-4000:]}")
        return rc, log.read_text(errors="replace")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, target in (("dsv3", f'"{sys.executable}" -m dsv3'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    r = DocRunner(bin_dir)
    made = subprocess.run([sys.executable, *MAKE_TINY], cwd=REPO, capture_output=True, text=True, timeout=600)
    if made.returncode != 0:
        pytest.skip(f"the examples' model could not be written ({' '.join(MAKE_TINY)}): {made.stderr.strip()[-300:]}")
    yield r
    r.stop_all()


def checkout_files() -> set[str]:
    """Files git sees in the checkout (untracked and ignored included), bytecode caches aside."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: cannot check that examples leave the checkout alone")
    return {ln for ln in out.stdout.splitlines() if not re.search(r"__pycache__|\.pytest_cache|\.pyc$", ln)}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_example_runs(block: Block, runner: DocRunner, tmp_path):
    runner.enter(block.path)
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    starts_server = "dsv3 serve" in block.code
    if starts_server and not port_free(SERVER_PORT):
        pytest.skip(f"{block.id}: port {SERVER_PORT}, which the example serves on, is taken by another process")
    if f"127.0.0.1:{SERVER_PORT}" in block.code and not starts_server and not runner.server_started:
        pytest.skip(f"{block.id}: uses the server an earlier block of this file starts, which did not run")
    before = checkout_files()
    rc, output = runner.run(block, tmp_path)
    assert rc == 0, f"{block.id} failed (exit {rc}):\n{block.code}\n--- output:\n{output[-6000:]}"
    runner.server_started |= starts_server
    added = checkout_files() - before
    assert not added, f"{block.id} wrote into the checkout: {sorted(added)}"


def test_every_block_names_its_language():
    """An unlabelled fence is neither run nor known to be prose: label it (text, yaml, ...)."""
    unlabelled = [b.id for b in all_blocks() if not b.lang]
    assert not unlabelled, f"label these code fences (```text for output or listings): {unlabelled}"


def test_skips_have_reasons_and_most_examples_run():
    runnable = [b for b in all_blocks() if b.runs]
    assert all(b.skip.strip() for b in runnable if b.skip)
    assert sum(not b.skip for b in runnable) >= 7, [b.id for b in runnable if not b.skip]


# references a reader of the checkout cannot open: the project's private specs and shared data files
_PRIVATE = re.compile(r"\.\./shared/(?:spec|data/)\S*|(?<![\w./-])spec/[\w./-]+\.md")
_REPO_PATH = re.compile(r"`((?:docs|src|tests|bench|configs|\.ci)/[\w./-]+)`")
_BARE_MD = re.compile(r"`([\w-]+\.md)`")  # a bare page name: README.md or a page of docs/


def test_docs_reference_only_files_a_user_has():
    bad, missing = [], []
    for f in doc_files():
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{f.relative_to(REPO)}:{n}"
            bad += [f"{where}: {m.group(0)}" for m in _PRIVATE.finditer(line)]
            missing += [f"{where}: {p}" for p in _REPO_PATH.findall(line) if not (REPO / p.rstrip("/")).exists()]
            missing += [f"{where}: {p}" for p in _BARE_MD.findall(line) if not any((d / p).exists() for d in (REPO, REPO / "docs"))]
    assert not bad, f"links to files outside the repository: {bad}"
    assert not missing, f"paths that do not exist in the checkout: {missing}"
