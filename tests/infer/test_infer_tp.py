"""Multi-process inference on CPU (gloo, tiny random model): `LLM(..., tensor_parallel_size=2)` equals
the single process (greedy and seeded sampling, MTP speculation whose drafter inputs travel as
references), bad sizes fail in one line, `dsv3 bench throughput` runs at tp 1 and tp 2, and the
seed's msrun-shaped inference line runs under `dsv3 launch` with 2 and 4 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsv3.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import free_port, write_tiny_model  # noqa: E402  (the server tests' tiny checkpoint writer)

PROMPTS = ["Hello", "The capital of France is a city that", "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_tp"))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _outputs(llm) -> list:
    from dsv3 import SamplingParams

    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, return_routed_experts=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, n=2, ignore_eos=True)
    outs = llm.generate(PROMPTS, greedy) + llm.generate(PROMPTS[:2], seeded)
    return [[(c.token_ids, c.routed_experts) for c in o.outputs] for o in outs]  # routes: rank 0's, global ids


def test_llm_tp2_ep_equals_one_process_with_speculation(model_dir):
    from dsv3 import LLM
    from dsv3.infer.executor import rank_info

    kw = dict(device="cpu", dtype="float32", speculative=True, max_num_seqs=4)
    one = LLM(str(model_dir), **kw)
    ref, full_bytes = _outputs(one), rank_info(one.engine.runner, 0)["weight_bytes"]
    llm = LLM(str(model_dir), tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    try:
        assert _outputs(llm) == ref
        stats = llm.engine.stats()
        assert stats["spec_num_draft_tokens"] > 0
        ranks = llm.engine.runner.ping()
        assert [r["rank"] for r in ranks] == [0, 1]
        assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] > 0
        assert all(r["requests"] == [] for r in ranks)
        assert all(r["weight_bytes"] < 0.75 * full_bytes for r in ranks)  # each rank holds its shard only
    finally:
        llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1])


def test_bad_sizes_one_line(model_dir, capsys):
    # 4 heads: 3 does not divide them (checked before any process starts)
    assert cli_main(["serve", str(model_dir), "--tensor-parallel-size", "3", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tensor-parallel-size 3: num_attention_heads 4 is not divisible by" in err, err
    assert cli_main(["bench", "throughput", "--model", str(model_dir), "-tp", "8", "--enable-expert-parallel"]) == 2
    assert "--tensor-parallel-size 8 with expert parallel: num_attention_heads 4 is not divisible" in capsys.readouterr().err


def test_bench_throughput_tp2(model_dir, tmp_path):
    # (tp 1: tests/serve/test_seed_lines.py)
    out = tmp_path / "tp2.json"
    r = subprocess.run([sys.executable, "-m", "dsv3", "bench", "throughput", "--model", str(model_dir), "--device", "cpu",
                        "--dtype", "float32", "--tensor-parallel-size", "2", "--dataset-name", "random", "--num-prompts", "4",
                        "--input-len", "12", "--output-len", "6", "--max-model-len", "128", "--disable-tqdm",
                        "--output-json", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["num_requests"] == 4


def _predict_yaml(path: Path, model_dir: Path, mp: int) -> Path:
    """The seed's predict YAML shape, pointed at the tiny checkpoint."""
    path.write_text(yaml.safe_dump({
        "seed": 0, "run_mode": "predict", "use_parallel": True, "load_checkpoint": str(model_dir / "model.safetensors"),
        "parallel_config": {"data_parallel": 1, "model_parallel": mp, "pipeline_stage": 1, "expert_parallel": 1,
                            "vocab_emb_dp": False},
        "model": {"model_config": {"max_decode_length": 1024}},
        "processor": {"tokenizer": {"tokenizer_file": str(model_dir / "tokenizer.json")}}}), encoding="utf-8")
    return path


def _launch(tmp_path: Path, yaml_path: Path, n: int, log: str):
    cmd = f"generate --config {yaml_path.name} --input '请介绍一下北京的景点' --max-tokens 8"
    return subprocess.run([sys.executable, "-m", "dsv3", "launch", cmd, str(n), str(n), "127.0.0.1", str(free_port()), "0",
                           log, "True", "300"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)


def test_seed_msrun_inference_line_2_and_4_processes(model_dir, tmp_path, capsys):
    one = _predict_yaml(tmp_path / "one.yaml", model_dir, 1)
    assert cli_main(["generate", "--config", str(one), "--input", "请介绍一下北京的景点", "--max-tokens", "8", "--quiet"]) == 0
    expected = capsys.readouterr().out.strip()
    assert expected
    for n in (2, 4):
        r = _launch(tmp_path, _predict_yaml(tmp_path / f"predict{n}.yaml", model_dir, n), n, f"output/msrun_log{n}")
        assert r.returncode == 0, r.stdout + r.stderr
        log0 = (tmp_path / f"output/msrun_log{n}/worker_0.log").read_text()
        assert expected in log0 and f"x {n} processes" in log0, log0
        for rank in range(1, n):  # rank 0 prints the output, the others follow
            assert expected not in (tmp_path / f"output/msrun_log{n}/worker_{rank}.log").read_text()


def test_world_size_not_matching_the_yaml(model_dir, tmp_path, monkeypatch, capsys):
    """Rank 0 of a torchrun launch of 2 with a YAML asking for 4: one line, exit 2, before any
    process group; `dsv3 launch` repeats a worker's such line and exits 2."""
    from dsv3.parallel.launch import _user_error

    cfg = _predict_yaml(tmp_path / "predict4.yaml", model_dir, 4)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(["generate", "--config", str(cfg), "--input", "x"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith("parallel_config data_parallel 1 x model_parallel 4 x pipeline_stage 1 = 4 processes, "
                         "but 2 were launched (dsv3 launch WORKER_NUM)"), line
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker_0.log").write_text("old: dsv3 generate: error: from an earlier run\n")
    start = (logs / "worker_0.log").stat().st_size
    (logs / "worker_0.log").write_text((logs / "worker_0.log").read_text() + "noise\n" + line + "\n")
    (logs / "worker_1.log").write_text(line + "\n")
    assert _user_error(logs, {0: start, 1: 0}) == line
    assert _user_error(logs, {0: (logs / "worker_0.log").stat().st_size}) is None


@pytest.mark.gpu
def test_llm_tp2_nccl_equals_one_gpu(model_dir):
    """The same on CUDA: NCCL for the model's collectives (rank r on cuda:r), gloo for the control group."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    from dsv3 import LLM

    kw = dict(device="cuda", dtype="float32", max_num_seqs=4, num_gpu_blocks=64)
    ref = _outputs(LLM(str(model_dir), **kw))
    llm = LLM(str(model_dir), tensor_parallel_size=2, **kw)
    try:
        assert _outputs(llm) == ref
    finally:
        llm.shutdown()
