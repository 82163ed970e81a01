"""The real `dsv3 serve` process, and `dsv3 bench serve | throughput | latency` end to end on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from serve_helpers import API_KEY, free_port
from dsv3.cli import main


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_dsv3_serve_process(tiny_model_dir):
    """The real process. Without --served-model-name the model is served under --model as given (here a
    relative path, as vLLM does) and /v1/models shows no absolute path; the limit flags reach the server."""
    port = free_port()
    cwd, name = tiny_model_dir.parent, tiny_model_dir.name
    cmd = [sys.executable, "-m", "dsv3", "serve", "--model", name, "--port", str(port),
           "--max-model-len", "256", "--max-num-seqs", "4", "--dtype", "float32",
           "--device", "cpu", "--api-key", "k1", "--log-level", "warning",
           "--max-request-bytes", "2000", "--max-logprobs", "2"]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        root = f"http://127.0.0.1:{port}"
        _wait_health(root, proc)
        client = openai.OpenAI(base_url=root + "/v1", api_key="k1", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == [name] and models[0].max_model_len == 256
        assert str(tiny_model_dir) not in client.models.list().model_dump_json()
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        assert client.completions.create(model=name, prompt="hi", max_tokens=2, logprobs=2).choices[0].logprobs
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(model=name, prompt="hi", max_tokens=2, logprobs=3)
        with pytest.raises(openai.APIStatusError, match="2000 bytes") as e:
            client.completions.create(model=name, prompt="x" * 3000, max_tokens=2)
        assert e.value.status_code == 413
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=root + "/v1", api_key="nope", max_retries=0).models.list()
        # a second server on the same port: one line, exit status 2, before any model loading
        busy = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2
        assert busy.stderr.strip().splitlines() == [busy.stderr.strip()]
        assert busy.stderr.startswith(f"dsv3 serve: error: cannot listen on 127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_bad_model_dir(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path), "--port", str(free_port())]) == 2
    assert "not a model directory (no config.json)" in capsys.readouterr().err


def test_bench_serve_random_and_sonnet(server, tmp_path, capsys):
    args = ["bench", "serve", "--base-url", server.root, "--api-key", API_KEY, "--num-prompts", "6",
            "--random-input-len", "16", "--random-output-len", "5", "--ignore-eos", "--max-concurrency", "3",
            "--save-result", "--result-dir", str(tmp_path), "--result-filename", "rand.json", "--disable-tqdm",
            "--metric-percentiles", "50,99"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Mean TTFT (ms):" in table and "P99 E2EL (ms):" in table
    res = json.loads((tmp_path / "rand.json").read_text())
    assert res["completed"] == 6 and res["failed"] == 0 and res["max_concurrency"] == 3
    assert res["output_lens"] == [5] * 6 and res["total_output_tokens"] == 30  # from the server's usage
    assert res["input_lens"] == [16] * 6 and res["total_input_tokens"] == 96
    assert res["mean_ttft_ms"] > 0 and res["mean_tpot_ms"] > 0 and res["p50_itl_ms"] >= 0
    assert res["max_concurrent_requests"] <= 3
    assert all(1 <= len(itl) <= 4 for itl in res["itls"])  # 5 tokens in <= 5 chunks (a late reader gets several per chunk)
    assert res["request_throughput"] == pytest.approx(6 / res["duration"])

    args = ["bench", "serve", "--backend", "openai-chat", "--base-url", server.root, "--api-key", API_KEY,
            "--dataset-name", "sonnet", "--sonnet-input-len", "120", "--sonnet-prefix-len", "50",
            "--sonnet-output-len", "4", "--num-prompts", "3", "--request-rate", "20", "--ignore-eos",
            "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm"]
    assert main(args) == 0
    saved = [p for p in tmp_path.iterdir() if p.name.startswith("openai-chat-20.0qps")]
    assert len(saved) == 1
    res = json.loads(saved[0].read_text())
    assert res["completed"] == 3 and res["total_output_tokens"] == 12 and res["request_rate"] == 20.0


def test_bench_serve_defaults_fit_the_server_context(server, tmp_path, capsys):
    """The default 1024-token prompts (+ BOS + 128 output) do not fit a small model's context (the
    quickstart's is 1024, this server's 512): they are shortened with one line; explicit lengths
    that cannot fit are refused in one line."""
    ctx = server.app.state.engine.max_model_len
    args = ["bench", "serve", "--base-url", server.root, "--api-key", API_KEY, "--num-prompts", "2",
            "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path), "--result-filename",
            "fit.json", "--random-output-len", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    fitted = ctx - 1 - 4
    assert (f"the default --random-input-len 1024 + --random-output-len 4 (+1 token(s) the server adds) exceed "
            f"the server's max_model_len {ctx}; using --random-input-len {fitted}") in out
    res = json.loads((tmp_path / "fit.json").read_text())
    assert res["completed"] == 2 and res["failed"] == 0 and res["input_lens"] == [fitted] * 2

    assert main(args[:-6] + ["--random-input-len", "1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv3 bench: error: --random-input-len 1024 + --random-output-len 128") and "\n" not in err


def test_bench_serve_unreachable(capsys):
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "m",
               "--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm"])
    assert rc == 2 and "no server is reachable at http://127.0.0.1:" in capsys.readouterr().err


def test_bench_throughput_and_latency(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tput.json"
    assert main(["bench", "throughput", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
                 "--num-prompts", "5", "--input-len", "12", "--output-len", "6", "--output-json", str(out),
                 "--disable-tqdm"]) == 0
    res = json.loads(out.read_text())
    assert res["num_requests"] == 5 and res["total_output_tokens"] == 30
    assert res["total_prompt_tokens"] == 5 * 13  # 12 + BOS
    assert res["output_tokens_per_second"] == pytest.approx(30 / res["elapsed_time"])
    assert "Throughput:" in capsys.readouterr().out

    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
                 "--batch-size", "2", "--input-len", "8", "--output-len", "4", "--num-iters-warmup", "1",
                 "--num-iters", "3", "--output-json", str(out), "--disable-tqdm"]) == 0
    res = json.loads(out.read_text())
    assert len(res["latencies"]) == 3 and set(res["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert min(res["latencies"]) <= res["percentiles"]["50"] <= max(res["latencies"])
    assert "Avg latency:" in capsys.readouterr().out
    assert not os.path.exists(str(out) + ".tmp")
