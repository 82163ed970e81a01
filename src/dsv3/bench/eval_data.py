"""The local evaluation files `dsv3 eval` reads, turned into prompts (formats: `eval_prompts`).

Layouts (those of the public releases; `shared/data/README.md` describes the copies):
- C-Eval: `DIR/{dev,val,test}/{subject}_{split}.csv` with a header `id,question,A,B,C,D,answer[,explanation]`;
- MMLU: `DIR/{dev,val,test}/{subject}_{split}.csv`, headerless `question,A,B,C,D,answer`;
- GSM8K: a JSONL file of `{"question", "answer": "...#### N"}` (few-shot examples from `train.jsonl` beside it);
- CLUEWSC: a FewCLUE JSONL file of `{"target": {"span1_text", "span2_text"}, "idx", "label", "text"}`.
Every file is capped in size; a bad row is one line naming the file, row and field.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from dsv3.bench import eval_prompts as P
from dsv3.errors import UserError

MAX_FILE_BYTES = 64 << 20
TASKS = ("ceval", "mmlu", "gsm8k", "cluewsc")


@dataclass
class Item:
    task: str
    subset: str
    id: str
    prompt: str
    target: str
    n_choices: int = 0  # 0: not multiple choice (GSM8K)


def _read(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes, over the {MAX_FILE_BYTES >> 20} MiB cap of a data file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None


def _csv_rows(path: Path, header: bool) -> list[dict]:
    """Rows as dicts with question, choices (A-D), answer letter, explanation; checked."""
    rows = list(csv.reader(io.StringIO(_read(path))))
    names = ["question", "A", "B", "C", "D", "answer"]
    if header:
        if not rows or not {"question", "A", "B", "C", "D", "answer"} <= set(rows[0]):
            raise UserError(f"{path}: expected a header with question,A,B,C,D,answer, got {rows[:1]}")
        names, rows = rows[0], rows[1:]
    out = []
    for no, row in enumerate(rows, 2 if header else 1):
        if len(row) != len(names):
            raise UserError(f"{path}: row {no} has {len(row)} fields, expected {len(names)} ({','.join(names)})")
        rec = dict(zip(names, row))
        if rec["answer"] not in "ABCD" or len(rec["answer"]) != 1:
            raise UserError(f"{path}: row {no}: answer must be one of A, B, C, D, got {rec['answer']!r}")
        out.append({"id": rec.get("id", str(no)), "question": rec["question"],
                    "choices": [rec[k] for k in "ABCD"], "answer": rec["answer"],
                    "explanation": rec.get("explanation", "")})
    return out


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    for no, line in enumerate(_read(path).split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {no} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}: line {no}: expected a JSON object")
        out.append((no, rec))
    return out


def _field(path: Path, no: int, rec: dict, *keys: str) -> str:
    value = rec
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, (str, int)):
        raise UserError(f"{path}: line {no}: field {'.'.join(keys)!r} missing or not a string")
    return str(value)


def _subjects(root: Path, split: str, wanted: list[str] | None) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{root}: no {split}/ folder (expected {split}/SUBJECT_{split}.csv files)")
    found = sorted(p.name[: -len(f"_{split}.csv")] for p in folder.glob(f"*_{split}.csv"))
    if wanted is None:
        if not found:
            raise UserError(f"{folder}: no *_{split}.csv files")
        return found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise UserError(f"{folder}: no subject {', '.join(missing)} (found: {', '.join(found) or 'none'})")
    return wanted


def _shots(root: Path, subject: str, k: int, header: bool) -> list[dict]:
    if k == 0:
        return []
    rows = _csv_rows(root / "dev" / f"{subject}_dev.csv", header)
    if len(rows) < k:
        raise UserError(f"{root}/dev/{subject}_dev.csv: {len(rows)} examples, fewer than --few-shot {k}")
    return rows[:k]


def load_ceval(root: Path, split: str, subjects: list[str] | None, limit: int | None, shots: int) -> list[Item]:
    items = []
    for subject in _subjects(root, split, subjects):
        if subject not in CEVAL_SUBJECTS_ZH:
            raise UserError(f"{root}: unknown C-Eval subject {subject!r} (its Chinese name is needed for the prompt)")
        demos = _shots(root, subject, shots, header=True)
        for r in _csv_rows(root / split / f"{subject}_{split}.csv", header=True)[:limit]:
            prompt = P.ceval_prompt(CEVAL_SUBJECTS_ZH[subject], r["question"], r["choices"], demos)
            items.append(Item("ceval", subject, r["id"], prompt, r["answer"], 4))
    return items


def load_mmlu(root: Path, split: str, subjects: list[str] | None, limit: int | None, shots: int) -> list[Item]:
    items = []
    for subject in _subjects(root, split, subjects):
        demos = _shots(root, subject, shots, header=False)
        for r in _csv_rows(root / split / f"{subject}_{split}.csv", header=False)[:limit]:
            items.append(Item("mmlu", subject, r["id"], P.mmlu_prompt(r["question"], r["choices"], demos),
                              r["answer"], 4))
    return items


def _gsm8k_rows(path: Path) -> list[dict]:
    rows = []
    for no, rec in _jsonl(path):
        question, answer = _field(path, no, rec, "question"), _field(path, no, rec, "answer")
        if "####" not in answer:
            raise UserError(f"{path}: line {no}: field 'answer' has no '#### N' final answer")
        reasoning, target = answer.rsplit("####", 1)
        rows.append({"id": str(no), "question": question, "reasoning": reasoning.strip(),
                     "answer": target.strip().replace(",", "")})
    return rows


def load_gsm8k(path: Path, train: Path | None, limit: int | None, shots: int) -> list[Item]:
    demos: list[dict] = []
    if shots:
        train = train or path.with_name("train.jsonl")
        demos = _gsm8k_rows(train)[:shots]
        if len(demos) < shots:
            raise UserError(f"{train}: {len(demos)} examples, fewer than --few-shot {shots}")
    return [Item("gsm8k", "main", r["id"], P.gsm8k_prompt(r["question"], demos), r["answer"])
            for r in _gsm8k_rows(path)[:limit]]


def cluewsc_question(text: str, span1: str, span2: str) -> str:
    """The yes/no question `docs/clients/cluewsc_to_mcq.py` writes for evalscope's general_mcq."""
    return f"{text}\n在这句话中，“{span2}”指的是“{span1}”吗？"


def load_cluewsc(path: Path, limit: int | None) -> list[Item]:
    items = []
    for no, rec in _jsonl(path)[:limit]:
        label = _field(path, no, rec, "label")
        if label not in ("true", "false"):
            raise UserError(f"{path}: line {no}: label must be 'true' or 'false', got {label!r}")
        question = cluewsc_question(_field(path, no, rec, "text"), _field(path, no, rec, "target", "span1_text"),
                                    _field(path, no, rec, "target", "span2_text"))
        items.append(Item("cluewsc", "default", str(rec.get("idx", no)), P.mcq_zh_prompt(question, ["是", "否"]),
                          "A" if label == "true" else "B", 2))
    return items


CEVAL_SUBJECTS_ZH = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计", "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学", "college_economics": "大学经济学",
    "business_administration": "工商管理", "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
    "teacher_qualification": "教师资格", "high_school_politics": "高中政治", "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治", "middle_school_geography": "初中地理", "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学", "law": "法学",
    "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学", "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格", "high_school_chinese": "高中语文", "high_school_history": "高中历史",
    "middle_school_history": "初中历史", "civil_servant": "公务员", "sports_science": "体育学",
    "plant_protection": "植物保护", "basic_medicine": "基础医学", "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师", "physician": "医师资格",
}
"""C-Eval's 52 subjects and the Chinese names its prompt uses (the C-Eval release's subject_mapping)."""
