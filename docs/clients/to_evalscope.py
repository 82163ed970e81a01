"""Lay out local C-Eval, MMLU and GSM8K files so evalscope's built-in `ceval`, `mmlu` and `gsm8k` read them.

    python docs/clients/to_evalscope.py ceval DIR OUT    # DIR/{dev,val}/SUBJECT_{dev,val}.csv (the C-Eval release)
    python docs/clients/to_evalscope.py mmlu  DIR OUT    # DIR/{dev,test}/SUBJECT_{dev,test}.csv (hendrycks/test)
    python docs/clients/to_evalscope.py gsm8k TEST.jsonl OUT [TRAIN.jsonl]   # default TRAIN: train.jsonl beside TEST

Why: with `dataset_args: {"ceval": {"local_path": DIR}}` evalscope does not read DIR's files itself (only
`general_mcq`-style adapters use its file loader). The built-in adapters hand a local path to Hugging Face
`datasets.load_dataset(DIR, name=SUBSET, split=SPLIT)`, the call they make for the hub copy: for C-Eval
`name=<subject>` and splits `val` / `dev`; for MMLU `name="all"`, splits `test` / `dev` and a `subject`
field per row (evalscope regroups by it); for GSM8K `name="main"`, splits `test` / `train`. A folder of
CSV files has one implicit config, `default`, so `name="accountant"` fails ("BuilderConfig 'accountant'
not found"). This script writes OUT/<config>/<split>.jsonl plus an OUT/README.md whose YAML header
declares each config and its split files (the `configs:` metadata `datasets` reads from a dataset card),
with the rows evalscope's `record_to_sample` expects. OUT is written under a temporary name, then renamed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

SPLITS = {"ceval": ("val", "dev"), "mmlu": ("test", "dev")}


def _csv(path: Path, header: bool) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    names = rows.pop(0) if header else ["question", "A", "B", "C", "D", "answer"]
    out = []
    for no, row in enumerate(rows, 2 if header else 1):
        if len(row) != len(names):
            sys.exit(f"{path}: row {no} has {len(row)} fields, expected {len(names)}")
        out.append(dict(zip(names, row)))
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _ceval_row(r: dict) -> dict:
    return {"id": int(r["id"]), "question": r["question"], **{k: r[k] for k in "ABCD"}, "answer": r["answer"],
            "explanation": r.get("explanation", "")}


def _mmlu_row(r: dict, subject: str) -> dict:
    if r["answer"] not in ("A", "B", "C", "D"):
        sys.exit(f"MMLU {subject}: answer must be A-D, got {r['answer']!r}")
    return {"question": r["question"], "subject": subject, "choices": [r[k] for k in "ABCD"],
            "answer": "ABCD".index(r["answer"])}


def _tables(kind: str, src: Path, train: Path | None) -> dict[str, dict[str, list[dict]]]:
    """config -> split -> rows."""
    if kind == "gsm8k":
        train = train or src.with_name("train.jsonl")
        return {"main": {"test": _jsonl(src), "train": _jsonl(train)}}
    configs: dict[str, dict[str, list[dict]]] = {}
    for split in SPLITS[kind]:
        for path in sorted((src / split).glob(f"*_{split}.csv")):
            subject = path.name[: -len(f"_{split}.csv")]
            if kind == "ceval":
                configs.setdefault(subject, {})[split] = [_ceval_row(r) for r in _csv(path, header=True)]
            else:
                configs.setdefault("all", {}).setdefault(split, []).extend(
                    _mmlu_row(r, subject) for r in _csv(path, header=False))
    if not configs:
        sys.exit(f"{src}: no {SPLITS[kind][0]}/*_{SPLITS[kind][0]}.csv files")
    return configs


def convert(kind: str, src: Path, out: Path, train: Path | None = None) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    card = ["---", "configs:"]
    for config, splits in _tables(kind, src, train).items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (tmp / config).mkdir(parents=True, exist_ok=True)
            with open(tmp / config / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            card += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    (tmp / "README.md").write_text("\n".join(card + ["---", ""]), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[1] not in ("ceval", "mmlu", "gsm8k"):
        sys.exit("usage: to_evalscope.py ceval|mmlu DIR OUT  |  to_evalscope.py gsm8k TEST.jsonl OUT [TRAIN.jsonl]")
    extra = Path(sys.argv[4]) if len(sys.argv) == 5 else None
    print(convert(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), extra))
