"""The seed guide's 1B recipe, built the way a user builds it: the 671B MindSpore YAML with the
sections the guide (`../shared/seeds/000_*.txt`) shows replaced by the guide's own YAML blocks."""

from __future__ import annotations

import re
from pathlib import Path

import yaml


def seed_guide(data_dir: Path) -> Path:
    return next((data_dir.parent / "seeds").glob("000_*.txt"))


def seed_1b_dict(data_dir: Path) -> dict:
    """pretrain_deepseek3_671b.yaml + every ```yaml block of the seed guide (top-level keys replaced)."""
    base = yaml.safe_load((data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml").read_text(encoding="utf-8"))
    text = seed_guide(data_dir).read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5, "the seed guide's YAML blocks were not found"
    for block in blocks:
        lines = block.splitlines()
        indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
        base.update(yaml.safe_load("\n".join(ln[indent:] for ln in lines)))
    # The guide edits the file in place, so its YAML anchors (&topk_bias_update_rate, &expert_num,
    # &micro_batch_num) also change the callback that refers to them; merging dicts loses that link.
    moe, par = base["moe_config"], base["parallel_config"]
    for cb in base["callbacks"]:
        if cb["type"] == "TopkBiasBalanceCallback":
            cb.update(balance_via_topk_bias=moe["balance_via_topk_bias"], topk_bias_update_rate=moe["topk_bias_update_rate"],
                      expert_num=moe["expert_num"], micro_batch_num=par["micro_batch_num"])
    return base


def write_seed_1b(data_dir: Path, dest: Path, data_prefix: str | None = None) -> Path:
    d = seed_1b_dict(data_dir)
    if data_prefix is not None:
        d["train_dataset"]["data_loader"]["config"]["data_path"] = [1, data_prefix]
    dest.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return dest
