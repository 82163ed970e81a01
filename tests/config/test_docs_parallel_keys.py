"""docs/distributed.md and the run-config loader agree: every `parallel` key the page shows loads,
and the page promises no key the loader rejects (issue 10: `dp_shard`, `pipeline_schedule` and
`stages_per_rank` were documented as run-config keys but rejected)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from dsv3.config.train import ParallelConfig, run_config_from_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def _layout_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text.split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_every_yaml_snippet_loads():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/distributed.md shows no YAML of the parallel section"
    for block in blocks:
        d = yaml.safe_load(block)
        cfg = run_config_from_dict({"data": {"data_path": ["unused"]}, **d})
        for key, value in d.get("parallel", {}).items():
            assert getattr(cfg.parallel, key) == value


def test_documented_layout_keys_are_the_loaders():
    fields = {f.name for f in dataclasses.fields(ParallelConfig)}
    table = set(re.findall(r"^\| `(\w+)`", _layout_section(), re.M))
    assert table == fields
    # keys given with a default in brackets ("`key` [default]") must be run-config keys too
    with_default = set(re.findall(r"`([a-z_]+)`\s*\[", _layout_section()))
    assert with_default <= fields, f"documented but rejected by the loader: {sorted(with_default - fields)}"
