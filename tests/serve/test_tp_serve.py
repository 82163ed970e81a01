"""`dsv3 serve --tensor-parallel-size 2` over HTTP with the official openai client: one real server
process (rank 0 + one spawned worker, gloo on CPU) covers chat, completions, streaming, concurrent ==
sequential, abort on client disconnect on every rank, and a worker killed mid-request taking the
server down with one clear line and a non-zero exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_helpers import free_port

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-tp"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _metrics(httpx, root: str) -> dict[tuple[str, str], float]:
    """{(metric, rank): value} of the per-rank gauges."""
    text = httpx.get(root + "/metrics", timeout=30).text
    return {(m, r): float(v) for m, r, v in re.findall(r'^dsv3:rank_(\w+)\{[^}]*rank="(\d+)"\} (\S+)$', text, re.M)}


def _wait_ranks(httpx, root: str, pred, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = _metrics(httpx, root)
        if m and pred(m):
            return m
        time.sleep(0.5)
    raise AssertionError(f"per-rank metrics never satisfied the condition: {m}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker process")
def test_serve_tp2_openai_client_abort_and_worker_death(tiny_model_dir, tmp_path):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", str(tiny_model_dir), "--tensor-parallel-size", "2",
                             "--port", str(port), "--api-key", KEY, "--dtype", "float32", "--device", "cpu",
                             "--max-model-len", "4096", "--served-model-name", "tiny", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(root + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=root + "/v1", api_key=KEY, max_retries=0, timeout=120)

        # chat, plain and streamed (the same greedy text)
        msgs = [{"role": "user", "content": "Tell me about Beijing."}]
        chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        assert chat.usage.completion_tokens > 0
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content

        # completions: concurrent requests equal sequential ones (prompts of different lengths, seeded sampling too)
        prompts = ["Hello", "The capital of France is", "一二三四五六七八九十", "a b c d e f g h i j k l m n"]

        def one(i: int) -> str:
            kw = dict(temperature=0) if i % 2 == 0 else dict(temperature=0.9, seed=100 + i)
            return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10, **kw).choices[0].text

        seq = [one(i) for i in range(len(prompts))]
        with ThreadPoolExecutor(len(prompts)) as ex:
            conc = list(ex.map(one, range(len(prompts))))
        assert conc == seq

        # every rank ran every forward
        m = _wait_ranks(httpx, root, lambda m: m[("forward_calls", "0")] > 0)
        assert m[("forward_calls", "0")] == m[("forward_calls", "1")]
        assert m[("weight_bytes", "1")] > 0 and m[("cache_bytes", "1")] > 0
        calls_before = m[("forward_calls", "1")]

        # a client that goes away mid-stream: the request is aborted on rank 0, and no rank computes for it any more
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", root + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            _wait_ranks(httpx, root, lambda m: m[("requests", "0")] == 1 and m[("requests", "1")] == 1)
        m = _wait_ranks(httpx, root, lambda m: m[("requests", "0")] == 0 and m[("requests", "1")] == 0)
        time.sleep(3)  # over a heartbeat later: no rank has computed anything more, all ran the same forwards
        m = _metrics(httpx, root)
        assert m[("requests", "1")] == 0 and m[("forward_calls", "0")] == m[("forward_calls", "1")]
        assert m[("forward_calls", "1")] < calls_before + 300  # it stopped long before max_tokens 400

        # a worker killed in the middle of a request: one line, non-zero exit, no hang
        (worker,) = [p for p in _children(proc.pid) if "dsv3.infer.worker" in Path(f"/proc/{p}/cmdline").read_text()]
        long = {**body, "max_tokens": 4000}  # cannot finish before the watchdog sees the death, even on a quiet machine
        with httpx.stream("POST", root + "/v1/completions", json=long, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(worker, signal.SIGKILL)
            rest, broken = [], False
            try:
                rest = list(lines)
            except httpx.HTTPError:  # the server went away mid-stream
                broken = True
            # or, when the failed step reached the engine first, the stream ends with an error event;
            # never a normal end of the 400 tokens
            assert broken or any('"error"' in x for x in rest), rest[-3:]
            assert not any('"finish_reason":"length"' in x.replace(" ", "") for x in rest), rest[-3:]
        rc = proc.wait(timeout=60)
        assert rc != 0
        out = (tmp_path / "serve.log").read_text()
        assert f"dsv3: worker rank 1 (pid {worker}) was killed by signal 9; shutting down" in out, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
