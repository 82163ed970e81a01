"""Per-rank memory of tensor-parallel inference: weight bytes, KV-cache bytes and peak RSS (VmHWM) of
every rank after generating, for tp 1, 2 (and 4) on the same checkpoint.

    flock /tmp/dsv3-bench.lock python bench/measure_tp_rss.py --model DIR [--tp 1 2 4] [--out bench/results/tp_rss.json]

DIR defaults to a random model of configs/tiny.yaml written to a temporary directory
(`bench/make_random_model.py`). Each tp size runs in its own process (a fresh default process group).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dsv3.bench.provenance import provenance  # noqa: E402


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(model: str, tp: int) -> dict:
    from dsv3 import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, dtype="float32", device="cpu", num_gpu_blocks=256)
    prompts = [{"prompt_token_ids": [5, 17, 42, 99, 7, 3, 11]}, {"prompt_token_ids": [8, 1, 64, 23]}]
    out = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    stats = llm.engine.stats()
    ranks = stats.get("ranks") or [{"rank": 0, "pid": os.getpid(), "weight_bytes": sum(
        t.numel() * t.element_size() for t in llm.engine.runner.model.state_dict().values()),
        "cache_bytes": int(llm.engine.runner.cache.data.nbytes)}]
    rows = [{**r, "peak_rss_bytes": _hwm(int(r["pid"]))} for r in ranks]
    text = [list(o.outputs[0].token_ids) for o in out]
    llm.shutdown()
    return {"tp": tp, "ranks": rows, "texts": text}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tp_rss.json"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.child)))
        return 0
    tmp = tempfile.TemporaryDirectory()
    model = a.model
    if model is None:
        model = tmp.name + "/m"
        subprocess.run([sys.executable, str(REPO / "bench" / "make_random_model.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                        "--out", model], check=True)
    res = []
    for tp in a.tp:
        p = subprocess.run([sys.executable, __file__, "--model", model, "--child", str(tp)], capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return 1
        res.append(json.loads(p.stdout.strip().splitlines()[-1]))
        for r in res[-1]["ranks"]:
            print(f"tp {tp} rank {r['rank']}: weights {r['weight_bytes'] / 2**20:.2f} MiB, cache {r['cache_bytes'] / 2**20:.2f} MiB, "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc = {"bench": "tp_rss", "command": " ".join(sys.argv), "git_commit": commit, "model": a.model or "random configs/tiny.yaml",
           "load_average": os.getloadavg(), "runs": res,
           "texts_equal_across_tp": all(r["texts"] == res[0]["texts"] for r in res), "provenance": provenance(REPO)}
    tmpf = a.out + ".tmp"
    Path(tmpf).write_text(json.dumps(doc, indent=2))
    os.replace(tmpf, a.out)
    print(f"texts equal across tp: {doc['texts_equal_across_tp']} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
