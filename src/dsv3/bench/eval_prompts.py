"""Prompt formats and answer extraction of `dsv3 eval`, as evalscope's adapters define them.

Read from evalscope's source (modelscope/evalscope, `evalscope/benchmarks/{ceval,mmlu,gsm8k,general_mcq}`
and `evalscope/utils/multi_choices.py`, 2025-26 `main`); the prompt wording is theirs (a prompt is only
comparable when it is the same text), the code is ours:

- C-Eval: a Chinese single-answer prompt naming the subject, options `A. x`; few-shot examples from `dev`
  with their explanation (`解析：`) and answer; the answer is the first `答案：[A-D]`.
- MMLU: the English single-answer chain-of-thought prompt, options `A) x`; few-shot examples end with
  `ANSWER: X`; the answer is the label after the last `ANSWER:` marker that has one, else the last
  capital letter of the reply when it is an option.
- GSM8K: "reason step by step ... \\boxed{}"; few-shot examples show the reasoning and a boxed answer;
  the answer is the last `\\boxed{...}`, else what follows "the answer is", else the last number;
  scored numerically.
- CLUEWSC: evalscope's `general_mcq` (the Chinese single-answer prompt, options `A) x`, 0-shot) on the
  question `docs/clients/cluewsc_to_mcq.py` writes; the answer is the label after the last `答案：`,
  else the last capital letter of the reply when it is an option.
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"

CEVAL_PROMPT = ("以下是中国关于{subject}的单项选择题，请选出其中的正确答案。你的回答的最后一行应该是这样的格式："
                "\"答案：[LETTER]\"（不带引号），其中 [LETTER] 是 A、B、C、D 中的一个。\n\n问题：{question}\n选项：\n{choices}\n")
CEVAL_FEWSHOT = "以下是一些示例问题：\n\n{fewshot}\n\n"
MCQ_COT_PROMPT = ("Answer the following multiple choice question. The last line of your response should be of the "
                  "following format: 'ANSWER: [LETTER]' (without quotes) where [LETTER] is one of {letters}. Think "
                  "step by step before answering.\n\n{question}\n\n{choices}")
MCQ_FEWSHOT = "Here are some examples of how to answer similar questions:\n\n{fewshot}\n\n"
MCQ_ZH_PROMPT = ("回答下面的单项选择题，请选出其中的正确答案。你的回答的全部内容应该是这样的格式：\"答案：[LETTER]\"（不带引号），"
                 "其中 [LETTER] 是 {letters} 中的一个。\n\n问题：{question}\n选项：\n{choices}\n")
GSM8K_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
GSM8K_FEWSHOT = "Here are some examples of how to solve similar problems:\n\n{fewshot}\n\n"

TEMPLATES = {"ceval": "evalscope-ceval-zh", "mmlu": "evalscope-mcq-single-answer-cot",
             "gsm8k": "evalscope-gsm8k-boxed-cot", "cluewsc": "evalscope-general-mcq-zh"}
"""Report names of the prompt formats above."""

# --- prompts ---------------------------------------------------------------------------------------


def _options(choices: list[str], sep: str) -> str:
    return "\n".join(f"{LETTERS[i]}{sep} {c}" for i, c in enumerate(choices))


def ceval_prompt(subject_zh: str, question: str, choices: list[str], shots: list[dict]) -> str:
    body = CEVAL_PROMPT.format(subject=subject_zh, question=question, choices=_options(choices, "."))
    if not shots:
        return body
    examples = "\n\n".join(f"问题：{s['question']}\n选项：\n{_options(s['choices'], '.')}\n解析：{s['explanation']}\n"
                           f"答案：{s['answer']}" for s in shots)
    return CEVAL_FEWSHOT.format(fewshot=examples) + "\n" + body


def mmlu_prompt(question: str, choices: list[str], shots: list[dict]) -> str:
    letters = ",".join(LETTERS[:len(choices)])
    body = MCQ_COT_PROMPT.format(letters=letters, question=question, choices=_options(choices, ")"))
    if not shots:
        return body
    examples = "\n\n".join(f"{s['question']}\n{_options(s['choices'], ')')}\nANSWER: {s['answer']}" for s in shots)
    return MCQ_FEWSHOT.format(fewshot=examples) + body


def mcq_zh_prompt(question: str, choices: list[str]) -> str:
    return MCQ_ZH_PROMPT.format(letters=",".join(LETTERS[:len(choices)]), question=question,
                                choices=_options(choices, ")"))


def gsm8k_prompt(question: str, shots: list[dict]) -> str:
    body = GSM8K_PROMPT.format(question=question)
    if not shots:
        return body
    examples = "\n\n".join(f"{s['question']}\n\nReasoning:\n{s['reasoning']}\n\nANSWER: \\boxed{{{s['answer']}}}"
                           for s in shots)
    return GSM8K_FEWSHOT.format(fewshot=examples) + body


# --- answer extraction -----------------------------------------------------------------------------

_CEVAL_ANSWER = re.compile(r"答案：([A-D])")
_MARKER_EN = re.compile(r"(?i)ANSWER\s*:\s*\**\s*")
_MARKER_ZH = re.compile(r"答案\s*[:：]\s*\**\s*")
_BRACKETED = re.compile(r"[\(\[（【]\s*([A-Za-z\d])\s*[\)\]）】]")
_LABEL = re.compile(r"[A-Za-z\d]+")


def ceval_answer(reply: str) -> str:
    m = _CEVAL_ANSWER.search(reply)
    return m.group(1) if m else ""


def _label_after(tail: str, options: str) -> str:
    """The option label right after an answer marker: `(B)`, `[B]`, `B`, `B.`, `B, because ...`."""
    m = _BRACKETED.match(tail)
    if m and m.group(1) in options:
        return m.group(1)
    m = _LABEL.match(tail)
    return m.group(0) if m and m.group(0) in options else ""


def mcq_answer(reply: str, n_choices: int, chinese: bool = False) -> str:
    """The label after the last answer marker that carries one; else the last capital letter of the reply
    when it is one of the options (a capital that is not an option is no answer)."""
    options = LETTERS[:n_choices]
    for marker in reversed(list((_MARKER_ZH if chinese else _MARKER_EN).finditer(reply))):
        label = _label_after(reply[marker.end():], options)
        if label:
            return label
    last = next((ch for ch in reversed(reply) if ch.isupper()), "")
    return last if last and last in options else ""


def _boxed(reply: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced), None when there is none."""
    start = reply.rfind("\\boxed")
    if start < 0:
        return None
    rest = reply[start + len("\\boxed"):]
    if not rest.startswith("{"):
        return rest.split("$")[0].strip()
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return rest[1:]


_NUMBER = re.compile(r"-?\d*\.?\d+")


def gsm8k_answer(reply: str) -> str:
    """The boxed answer, else the text after "the answer is", else the last number; commas, `$`, `%`
    and a trailing period stripped."""
    text = _boxed(reply)
    if text is None and "he answer is" in reply:
        text = reply.split("he answer is")[-1].strip().split("\n")[0]
    if text is None:
        numbers = _NUMBER.findall(reply.replace(",", ""))
        text = numbers[-1] if numbers else ""
    text = text.replace(",", "").replace("$", "").replace("\\%", "").replace("%", "").strip().rstrip(".")
    number = _NUMBER.search(text) if not _is_number(text) else None
    return number.group(0) if number else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def numbers_equal(pred: str, target: str) -> bool:
    if _is_number(pred) and _is_number(target):
        return abs(float(pred) - float(target)) < 1e-6
    return pred != "" and pred == target
