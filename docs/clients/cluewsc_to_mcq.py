"""Convert CLUEWSC (FewCLUE json lines) into evalscope's `general_mcq` JSONL (also read by lm-eval).

    python docs/clients/cluewsc_to_mcq.py CLUEWSC.json OUT_DIR   # FewCLUE's cluewsc/dev_few_all.json
writes OUT_DIR/cluewsc_val.jsonl with one record per line:
    {"id", "question": "<text>\\n在这句话中，“<span2>”指的是“<span1>”吗？", "A": "是", "B": "否", "answer": "A"|"B"}
(label "true" -> A). evalscope finds `{subset}_val.jsonl` for subset "cluewsc" in `local_path`.
"""

import json
import os
import sys


def convert(src: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, "cluewsc_val.jsonl")
    tmp = dst + ".tmp"
    with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as g:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            t = row["target"]
            question = f"{row['text']}\n在这句话中，“{t['span2_text']}”指的是“{t['span1_text']}”吗？"
            answer = {"true": "A", "false": "B"}.get(row["label"])
            if answer is None:
                sys.exit(f"{src}:{no}: label must be 'true' or 'false', got {row['label']!r}")
            rec = {"id": row["idx"], "question": question, "A": "是", "B": "否", "answer": answer}
            g.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: cluewsc_to_mcq.py CLUEWSC.json OUT_DIR")
    print(convert(sys.argv[1], sys.argv[2]))
