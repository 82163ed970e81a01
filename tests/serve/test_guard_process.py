"""Issue 25 S7 and use item 3 through the real `dsv3 serve` process: connections that never finish their
headers are closed (a slowloris held every slot), the API description is behind --api-key, a client
that disconnects logs one line (not a CancelledError traceback), and a base install without the
serve extra gets one line naming it instead of a ModuleNotFoundError traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from serve_helpers import free_port
from test_cli_and_bench import _wait_health

KEY = "k-guard"


def _serve(model_dir, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv3", "serve", str(model_dir), "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--max-num-seqs", "4", "--api-key", KEY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stalled_headers_docs_and_disconnects(tiny_model_dir):
    port = free_port()
    proc = _serve(tiny_model_dir, port, "--header-timeout", "2")
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_health(root, proc)
        auth = {"Authorization": f"Bearer {KEY}"}
        # the API description lists every route and field: behind the key like /v1
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(root + path, timeout=30).status_code == 401, path
            assert httpx.get(root + path, headers=auth, timeout=30).status_code == 200, path

        # 60 connections that stall inside their headers, and 10 that send nothing
        stalled = []
        for i in range(70):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if i < 60:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            stalled.append(s)
        t0 = time.perf_counter()
        assert httpx.get(root + "/health", timeout=10).status_code == 200  # others are served meanwhile
        r = httpx.post(root + "/v1/completions", headers=auth, timeout=60,
                       json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        for s in stalled:
            assert s.recv(100) == b""  # closed by the server (a held connection times out the recv: 30 s)
            s.close()
        assert time.perf_counter() - t0 < 25

        # a client that gives up on a long non-streamed request: one log line, no traceback
        try:
            httpx.post(root + "/v1/completions", headers=auth, timeout=1.0,
                       json={"prompt": "hi", "max_tokens": 400, "ignore_eos": True})
        except httpx.ReadTimeout:
            pass
        time.sleep(2)
        assert httpx.get(root + "/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if "disconnected before the response" in line]
    assert len(lines) == 1 and "POST /v1/completions" in lines[0], err[-3000:]
    assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]


def _without(tmp_path, *modules: str) -> dict:
    """An environment where `modules` cannot be imported (as in a base install without the extra)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    for name in modules:
        (shadow / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    return env


def test_base_install_names_the_extra_in_one_line(tmp_path, tiny_model_dir):
    env = _without(tmp_path, "fastapi", "uvicorn", "aiohttp", "httpx")
    for args, verb, missing in (
            (["serve", str(tiny_model_dir), "--port", str(free_port())], "dsv3 serve", "fastapi, uvicorn"),
            (["bench", "serve", "--num-prompts", "1"], "dsv3 bench serve", "aiohttp, httpx")):
        r = subprocess.run([sys.executable, "-m", "dsv3", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert r.stderr.strip() == (f"dsv3 {args[0]}: error: {verb} needs {missing}, not installed here: "
                                    f"pip install 'dsv3[serve]'"), r.stderr[-2000:]
