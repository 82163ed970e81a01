"""`dsv3 eval` end to end: the real `dsv3 serve` process on a tiny random model, the real CLI, a few items
of each dataset of ../shared/data (C-Eval, MMLU, GSM8K, CLUEWSC); the report's structure and that every
reply was scored (random weights: the accuracy value is not checked). Then evalscope's extraction rules
on written replies, and bad data as one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import free_port, write_tiny_model  # noqa: E402
from test_cli_and_bench import _wait_health  # noqa: E402  (tests/serve: /health polling of a server process)

from dsv3.bench import eval_prompts as P  # noqa: E402

DATA = REPO.parent / "shared" / "data"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _dsv3(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("eval_model"), max_position_embeddings=2048)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(model), "--port", str(port),
                             "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "8", "--api-key", "k",
                             "--log-level", "warning"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_health(root, proc, timeout=180)
        yield root
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.skipif(not (DATA / "ceval").is_dir(), reason="needs ../shared/data (C-Eval, MMLU, GSM8K, CLUEWSC)")
def test_eval_every_dataset_through_the_server(server, tmp_path):
    out = tmp_path / "report.json"
    r = _dsv3("eval", "--base-url", server, "--api-key", "k", "--ceval", str(DATA / "ceval"),
              "--ceval-subjects", "logic,accountant", "--mmlu", str(DATA / "mmlu"), "--mmlu-subjects", "astronomy",
              "--gsm8k", str(DATA / "gsm8k" / "test_even.jsonl"),
              "--cluewsc", str(DATA / "cluewsc" / "dev_few_all.json"),
              "--limit", "2", "--few-shot", "ceval=1", "--few-shot", "gsm8k=1", "--max-tokens", "6",
              "--concurrency", "4", "--output-json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    tasks = rep["tasks"]
    assert list(tasks) == ["ceval", "mmlu", "gsm8k", "cluewsc"]
    assert {t: (v["template"], v["few_shot"], v["n"]) for t, v in tasks.items()} == {
        "ceval": ("evalscope-ceval-zh", 1, 4), "mmlu": ("evalscope-mcq-single-answer-cot", 5, 2),
        "gsm8k": ("evalscope-gsm8k-boxed-cot", 1, 2), "cluewsc": ("evalscope-general-mcq-zh", 0, 2)}
    assert set(tasks["ceval"]["subsets"]) == {"logic", "accountant"} and tasks["ceval"]["split"] == "val"
    assert tasks["mmlu"]["subsets"]["astronomy"]["n"] == 2 and tasks["mmlu"]["split"] == "test"
    assert len(rep["samples"]) == 10 and rep["model"] and rep["generation"]["max_tokens"] == 6
    for s in rep["samples"]:
        assert "error" not in s and s["reply"], s  # every request answered with text
        # the report's answer is the task's extraction rule applied to the reply, and scored against the target
        pred = {"ceval": P.ceval_answer(s["reply"]), "gsm8k": P.gsm8k_answer(s["reply"]),
                "mmlu": P.mcq_answer(s["reply"], 4), "cluewsc": P.mcq_answer(s["reply"], 2, chinese=True)}[s["task"]]
        assert s["pred"] == pred
        assert s["correct"] == (P.numbers_equal(pred, s["target"]) if s["task"] == "gsm8k" else pred == s["target"])
    golds = {(s["task"], s["id"]): s["target"] for s in rep["samples"] if s["subset"] in ("astronomy", "default")}
    assert golds == {("mmlu", "1"): "A", ("mmlu", "2"): "D", ("cluewsc", "0"): "A", ("cluewsc", "1"): "B"}
    for t in tasks.values():
        assert t["accuracy"] == pytest.approx(t["correct"] / t["n"]) and t["errors"] == 0
    assert "accuracy" in r.stdout and "saved" in r.stdout


def test_eval_refuses_bad_data_in_one_line(tmp_path):
    """Checked before any request (no server needed)."""
    server = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "logic_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n")
    r = _dsv3("eval", "--base-url", server, "--ceval", str(tmp_path), "--few-shot", "ceval=0",
              "--output-json", str(tmp_path / "r.json"))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"dsv3 eval: error: {tmp_path}/val/logic_val.csv: row 2: answer must be one of A, B, C, D, got 'E'")
    r = _dsv3("eval", "--base-url", server, "--mmlu", str(tmp_path), "--mmlu-split", "val", "--mmlu-subjects", "x",
              "--output-json", str(tmp_path / "r.json"))
    assert r.returncode == 2 and r.stderr.strip() == f"dsv3 eval: error: {tmp_path}/val: no subject x (found: logic)"
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    r = _dsv3("eval", "--base-url", server, "--gsm8k", str(bad), "--few-shot", "gsm8k=0", "--output-json", "x.json")
    assert r.returncode == 2 and "g.jsonl: line 1: field 'answer' has no '#### N' final answer" in r.stderr
    assert "\n" not in r.stderr.strip() and not (tmp_path / "r.json").exists()


def test_prompts_follow_evalscope():
    shot = {"question": "Q1", "choices": ["w", "x", "y", "z"], "answer": "C"}
    q = P.mmlu_prompt("Why?", ["a", "b", "c", "d"], [shot])
    assert q.startswith("Here are some examples of how to answer similar questions:\n\nQ1\nA) w\nB) x\nC) y\nD) z\n"
                        "ANSWER: C\n\nAnswer the following multiple choice question. The last line")
    assert q.endswith("one of A,B,C,D. Think step by step before answering.\n\nWhy?\n\nA) a\nB) b\nC) c\nD) d")
    c = P.ceval_prompt("逻辑学", "问?", ["甲", "乙", "丙", "丁"], [])
    assert c.startswith("以下是中国关于逻辑学的单项选择题") and c.endswith("问题：问?\n选项：\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n")
    g = P.gsm8k_prompt("2+2?", [{"question": "1+1?", "reasoning": "1+1=2", "answer": "2"}])
    assert g == ("Here are some examples of how to solve similar problems:\n\n1+1?\n\nReasoning:\n1+1=2\n\n"
                 "ANSWER: \\boxed{2}\n\n2+2?\nPlease reason step by step, and put your final answer within \\boxed{}.")


@pytest.mark.parametrize("reply, n, zh, want", [
    ("I think ANSWER: B", 4, False, "B"),
    ("ANSWER: [LETTER]\n...so ANSWER: (C)", 4, False, "C"),   # an echoed placeholder is skipped
    ("ANSWER: D, not A", 4, False, "D"),
    ("no marker, the best is C", 4, False, "C"),               # last capital letter that is an option
    ("no marker, Z", 4, False, ""),                              # a capital that is not an option
    ("分析……答案：B", 2, True, "B"),
    ("答案: A。", 2, True, "A"),
    ("答案：C", 2, True, ""),                                    # C is not an option of a yes/no question
])
def test_mcq_answer(reply, n, zh, want):
    assert P.mcq_answer(reply, n, chinese=zh) == want


@pytest.mark.parametrize("reply, want", [
    ("so \\boxed{1,234} dollars", "1234"), ("\\boxed{\\frac{1}{2}} then \\boxed{$18}", "18"),
    ("The answer is 42 apples.", "42"), ("3 + 4 = 7, then 7 * 2 = 14.", "14"), ("no number", ""),
])
def test_gsm8k_answer(reply, want):
    assert P.gsm8k_answer(reply) == want


def test_ceval_answer_and_numbers():
    assert P.ceval_answer("解析……答案：C\n答案：A") == "C" and P.ceval_answer("答案是B") == ""
    assert P.numbers_equal("18.0", "18") and not P.numbers_equal("", "18") and not P.numbers_equal("17", "18")


@pytest.mark.skipif(not (DATA / "ceval").is_dir(), reason="needs ../shared/data (C-Eval, MMLU, GSM8K)")
def test_to_evalscope_lays_out_configs(tmp_path):
    """docs/clients/to_evalscope.py: one config per C-Eval subject ("all" for MMLU, "main" for GSM8K), a JSONL
    file per split, and a dataset card naming them (what `datasets.load_dataset(DIR, name=, split=)` reads)."""
    script = str(REPO / "docs" / "clients" / "to_evalscope.py")
    for kind, src in (("ceval", DATA / "ceval"), ("mmlu", DATA / "mmlu"),
                      ("gsm8k", DATA / "gsm8k" / "test_even.jsonl")):
        r = subprocess.run([sys.executable, script, kind, str(src), str(tmp_path / kind)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
    card = (tmp_path / "ceval" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nconfigs:\n- config_name: accountant\n  data_files:\n  - split: val\n"
                           "    path: accountant/val.jsonl\n  - split: dev\n    path: accountant/dev.jsonl\n")
    assert card.count("- config_name:") == len(list((DATA / "ceval" / "val").glob("*_val.csv")))
    row = json.loads((tmp_path / "ceval" / "logic" / "dev.jsonl").read_text(encoding="utf-8").split("\n")[0])
    assert set(row) == {"id", "question", "A", "B", "C", "D", "answer", "explanation"} and row["explanation"]
    lines = (tmp_path / "mmlu" / "all" / "test.jsonl").read_text(encoding="utf-8").split("\n")
    mmlu = [json.loads(x) for x in lines if x]
    assert len(mmlu) == sum(len(list(csv.reader(f.open(encoding="utf-8", newline=""))))
                            for f in (DATA / "mmlu" / "test").glob("*_test.csv"))
    assert mmlu[0]["subject"] == "abstract_algebra" and mmlu[0]["answer"] in range(4) and len(mmlu[0]["choices"]) == 4
    assert "config_name: main" in (tmp_path / "gsm8k" / "README.md").read_text()
    assert (tmp_path / "gsm8k" / "main" / "train.jsonl").is_file() and not list(tmp_path.glob("*.tmp"))
