"""`dsv3 score` (the real CLI, a fresh process at --threads 1) gives the same logprobs, `==`, as a
batch-invariant `LLM` on the same checkpoint reports for the same tokens; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsv3 import LLM
from dsv3 import threads
from dsv3.cli import main as cli_main

from exact_helpers import one_thread, run, sampled, tiny_model  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny512")
    tiny_model(vocab_size=512).save_pretrained(d, tokenizer=None)
    return d


def score(model_dir, lines: list, tmp_path) -> subprocess.CompletedProcess:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return subprocess.run([sys.executable, "-m", "dsv3", "--threads", "1", "score", str(model_dir), "--input", str(src),
                           "--output", str(out)], capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_score_cli_equals_engine(model_dir, tmp_path):
    engine = LLM(str(model_dir), batch_invariant=True, block_size=4, max_num_batched_tokens=6).engine
    prompts = [[5, 9, 200, 31, 7, 77, 400], [3, 3, 3, 100, 2]]
    outs = run(engine, [(str(i), p, sampled(i), 0) for i, p in enumerate(prompts)])
    lines = [{"prompt_token_ids": p, "completion_token_ids": outs[str(i)].outputs[0].token_ids} for i, p in enumerate(prompts)]
    proc = score(model_dir, lines, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for i, rec in enumerate(got):
        o = outs[str(i)]
        c = o.outputs[0]
        assert rec["logprobs"] == [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
        assert rec["prompt_logprobs"] == [None] + [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]


def test_score_cli_bad_line_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")  # restored after: the CLI exports its --threads count
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt_token_ids": [1, 2], "completion_token_ids": [3]}\n{"prompt_token_ids": [1], "completion_token_ids": [3, 999]}\n')
    rc = cli_main(["--threads", "1", "score", str(model_dir), "--input", str(src), "--output", str(tmp_path / "out.jsonl")])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dsv3 score: error: {src} line 2: completion_token_ids must be a list of integers in [0, 512)"]
    assert not (tmp_path / "out.jsonl").exists()
