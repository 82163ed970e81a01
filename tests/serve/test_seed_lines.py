"""The seed's vLLM command lines, as written, with only the sizes shrunk for a CPU:
`benchmark_serving.py` (-> `dsv3 bench serve`), `benchmark_throughput.py`, `benchmark_latency.py`
and the `vllm serve MODEL_DIR ...` flags. Results carry vLLM's keys."""

from __future__ import annotations

import json

import pytest

from serve_helpers import ServerThread, free_port
from dsv3.bench.datasets import SONNET_LINES
from dsv3.cli import main


@pytest.fixture(scope="module")
def path_named_server(engine, tiny_model_dir):
    """Served under the model path as given (vLLM's default name), no API key, as the seed runs it."""
    from dsv3.serve.app import build_app

    with ServerThread(build_app(engine, str(tiny_model_dir))) as s:
        yield s


def _seed_serving_line(model: str, port: int, input_len: int, prefix_len: int, output_len: int, num: int,
                       result_dir: str) -> list[str]:
    return ["bench", "serve", "--model", model, "--endpoint", "/v1/chat/completions", "--dataset-name", "sonnet",
            "--sonnet-input-len", str(input_len), "--sonnet-prefix-len", str(prefix_len),
            "--sonnet-output-len", str(output_len), "--dataset-path", "sonnet.txt", "--num-prompts", str(num),
            "--max-concurrency", "4", "--result-dir", result_dir, "--result-filename", "result.json",
            "--save-result", "--port", str(port)]


def test_seed_benchmark_serving_line(path_named_server, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # --dataset-path is honoured: a file whose lines are not the built-in sonnets
    lines = [f"Line {i} of a poem that no sonnet has, word {i * 7}\n" for i in range(40)]
    (tmp_path / "sonnet.txt").write_text("".join(lines))
    rdir = str(tmp_path / "benchmark_result")
    args = _seed_serving_line(str(tiny_model_dir), path_named_server.port, 120, 32, 6, 8, rdir)
    assert main(args + ["--disable-tqdm"]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "benchmark_result" / "result.json").read_text())
    assert res["completed"] == 8 and res["failed"] == 0 and res["endpoint"] == "/v1/chat/completions"
    assert res["model_id"] == str(tiny_model_dir) and res["max_concurrency"] == 4
    for key in ("duration", "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
                "mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "input_lens", "output_lens"):
        assert key in res, key
    assert all(0 < n <= 6 for n in res["output_lens"])
    assert all(95 <= n <= 145 for n in res["input_lens"])  # ~120 tokens of chat prompt, whole lines
    text = "".join(res["generated_texts"])
    assert text  # the chat payload was used (completions payload to the chat endpoint would fail)
    # the seed's own sizes (1024 in + 1024 out) do not fit the tiny model's context: one clear line
    args = _seed_serving_line(str(tiny_model_dir), path_named_server.port, 1024, 32, 1024, 100, rdir)
    (tmp_path / "sonnet.txt").write_text("".join(SONNET_LINES))
    assert main(args + ["--disable-tqdm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not fit the server's max_model_len 512" in err[0], err


def test_seed_missing_dataset_path(path_named_server, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _seed_serving_line(str(tiny_model_dir), path_named_server.port, 120, 32, 4, 2, str(tmp_path))
    assert main(args) == 2
    assert "sonnet.txt: cannot read dataset" in capsys.readouterr().err


def test_seed_throughput_and_latency_lines(tiny_model_dir, tmp_path, capsys):
    m = str(tiny_model_dir)
    common = ["--model", m, "--trust-remote-code", "--tensor-parallel-size", "1", "--enforce-eager",
              "--max-model-len", "256"]
    out = tmp_path / "tput.json"
    assert main(["bench", "throughput", *common, "--dataset-name", "random", "--num-prompts", "3",
                 "--input-len", "16", "--output-len", "5", "--output-json", str(out), "--disable-tqdm"]) == 0
    printed = capsys.readouterr().out
    assert "--trust-remote-code accepted" in printed and "--enforce-eager accepted" in printed
    res = json.loads(out.read_text())
    for key in ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second"):
        assert key in res, key
    assert res["num_requests"] == 3 and res["total_num_tokens"] == 3 * (17 + 5)
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", *common, "--input-len", "16", "--output-len", "4", "--batch-size", "1",
                 "--num-iters", "2", "--num-iters-warmup", "1", "--output-json", str(out), "--disable-tqdm"]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"avg_latency", "latencies", "percentiles"} and len(res["latencies"]) == 2
    # the seed's sizes exceed this context, and its tensor-parallel size needs devices we do not have
    capsys.readouterr()
    assert main(["bench", "latency", *common, "--input-len", "1024", "--output-len", "1024", "--batch-size", "1",
                 "--num-iters", "10"]) == 2
    assert "exceed the engine's max_model_len 256" in capsys.readouterr().err
    assert main(["bench", "latency", "--model", m, "--tensor-parallel-size", "32", "--num-iters", "1"]) == 2
    assert "--tensor-parallel-size 32" in capsys.readouterr().err


def test_serve_positional_model_dir_and_compat_flags(tiny_model_dir, tmp_path, capsys):
    # the two ways of naming the model must agree; neither is an error of one line
    assert main(["serve", str(tiny_model_dir), "--model", str(tmp_path), "--port", str(free_port())]) == 2
    assert "two models given" in capsys.readouterr().err
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--trust-remote-code", "--enforce-eager", "--port", str(free_port())]) == 2
    cap = capsys.readouterr()
    assert "not a model directory" in cap.err and "--trust-remote-code accepted" in cap.out


def test_vllm_style_serve_process(tiny_model_dir):
    """`dsv3 serve MODEL_DIR` with the seed's vLLM flags plus the issue's features, as a real process."""
    import subprocess
    import sys

    import httpx
    import openai

    from test_cli_and_bench import _wait_health

    port = free_port()
    cmd = [sys.executable, "-m", "dsv3", "serve", str(tiny_model_dir), "--trust-remote-code", "--enforce-eager",
           "--tensor-parallel-size", "1", "--max-model-len", "256", "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--reasoning-parser", "deepseek_r1", "--speculative", "--no-enable-prefix-caching",
           "--served-model-name", "m", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        root = f"http://127.0.0.1:{port}"
        _wait_health(root, proc)
        client = openai.OpenAI(base_url=root + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           temperature=0.7, seed=1, extra_body={"ignore_eos": True})
        assert r.choices[0].message.reasoning_content  # random text, no </think>: all reasoning
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # caching is off
        metrics = httpx.get(root + "/metrics", timeout=30).text
        assert "vllm:spec_decode_num_draft_tokens_total" in metrics
        assert "vllm:prefix_cache_hits_total" in metrics
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "--trust-remote-code accepted" in out and "--enforce-eager accepted" in out
