"""evalscope itself against `dsv3 serve`: `docs/clients/evalscope_eval.sh` as a user runs it (the real
server, started by `offline.sh` in a network namespace with only loopback, so nothing can be fetched),
evalscope's built-in `ceval`, `mmlu`, `gsm8k` and `general_mcq` (CLUEWSC) on the local files of
../shared/data, a tiny random model, 2 items per subset. Random weights: every item must be answered
and scored, the accuracy value is not checked.

evalscope is not part of dsv3's install (a ~600 MB tree: modelscope, datasets, pyarrow, pandas, nltk):
the test runs where `$EVALSCOPE_VENV/bin/evalscope` exists (default /tmp/venv-evalscope, the venv
docs/clients/README.md sets up), and skips with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import free_port, write_tiny_model  # noqa: E402

DATA = REPO.parent / "shared" / "data"
VENV = Path(os.environ.get("EVALSCOPE_VENV", "/tmp/venv-evalscope"))


def _skip_reason() -> str | None:
    if not (VENV / "bin" / "evalscope").exists():
        return (f"evalscope is not installed in {VENV} (python -m venv {VENV} --system-site-packages && "
                f"{VENV}/bin/pip install evalscope; or set EVALSCOPE_VENV)")
    if not all((DATA / d).is_dir() for d in ("ceval", "mmlu", "gsm8k", "cluewsc")):
        return f"needs C-Eval, MMLU, GSM8K and CLUEWSC under {DATA}"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        return "offline.sh needs `unshare -n` (a network namespace: root or user namespaces)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_evalscope_scores_every_dataset_against_dsv3_serve(tmp_path):
    model = write_tiny_model(tmp_path / "model", max_position_embeddings=2048)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "VENV": str(VENV), "PORT": str(free_port()), "LIMIT": "2",
           "MAX_TOKENS": "8", "CEVAL_SUBJECTS": "logic,accountant", "MMLU_SUBJECTS": "astronomy",
           "DSV3": f"{sys.executable} -m dsv3", "DSV3_SERVE_LOG": str(tmp_path / "serve.log"),
           "DSV3_SERVE_ARGS": "--max-num-seqs 8 --dtype float32 --device cpu"}
    r = subprocess.run(["bash", str(REPO / "docs" / "clients" / "evalscope_eval.sh"), str(model), str(DATA), str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    runs = list(out.glob("*/reports/dsv3"))
    assert len(runs) == 1, runs
    want = {"ceval": {"logic": 2, "accountant": 2}, "mmlu": {"astronomy": 2}, "gsm8k": {"main": 2},
            "general_mcq": {"cluewsc": 2}}
    for name, subsets in want.items():
        rep = json.loads((runs[0] / f"{name}.json").read_text())
        metric = rep["metrics"][0]
        assert metric["identity"]["name"] == "accuracy" and 0.0 <= metric["score"] <= 1.0
        got = {s["name"]: s["num"] for c in metric["categories"] for s in c["subsets"]}
        assert got == subsets, (name, got)
        for subset in subsets:  # every item was answered by the server and scored
            rows = [json.loads(line) for line in (runs[0].parent.parent / "reviews" / "dsv3" / f"{name}_{subset}.jsonl")
                    .read_text().splitlines() if line.strip()]
            assert len(rows) == 2
            for row in rows:
                score = row["sample_score"]["score"]
                assert score["status"] == "success" and score["prediction"], (name, subset, score)
