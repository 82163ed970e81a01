"""bench/bench_multiturn.py --mode spec end to end on the tiny random preset (a few tokens): the JSON
it writes has both sampling modes, the acceptance rate, the provenance, and greedy outputs identical
with and without MTP speculation."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_spec_mode_writes_result(tmp_path, monkeypatch):
    out = tmp_path / "mtp_spec.json"
    monkeypatch.setattr(sys, "argv", ["bench_multiturn.py", "--mode", "spec", "--config", str(REPO / "configs" / "tiny.yaml"),
                                      "--output-tokens", "6", "--user-tokens", "8", "--num-prompts", "2", "--out", str(out)])
    runpy.run_path(str(REPO / "bench" / "bench_multiturn.py"), run_name="__main__")
    res = json.loads(out.read_text())
    assert res["prompts"] == "random ids" and res["num_prompts"] == 2 and res["command"].startswith("python bench/bench_multiturn.py")
    assert len(res["load_avg_1_5_15_before"]) == 3 and "git_commit" in res
    assert res["greedy"]["outputs_identical"] is True
    for mode in ("greedy", "sampled"):
        row = res[mode]
        assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["drafts"] >= 1 and row["spec_steps"] >= 1
        assert row["plain_decode_tok_s"] > 0 and row["speculative_decode_tok_s"] > 0
