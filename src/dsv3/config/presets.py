"""Model presets: YAML files under `configs/` (a `model:` section) or HF `config.json`."""

from __future__ import annotations

from pathlib import Path

from dsv3.config.load import apply_overrides, from_dict, is_mindspore_yaml, read_yaml
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The presets, shipped as package data (`dsv3/configs`, in a checkout a link to the repository's `configs/`)."""


def resolve_preset(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped preset (`configs/NAME.yaml`, with or without .yaml, or `configs/NAME.yaml` itself)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    name = p.name if p.parent.name == "configs" else str(name_or_path)  # `configs/tiny.yaml` outside a checkout
    for cand in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / name):
        if cand.is_file():
            return cand
    raise UserError(f"config {str(name_or_path)!r} not found (a path, or one of: "
                    f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def load_model_config(name_or_path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """ModelConfig from a YAML preset (`model:` section), a MindSpore-style YAML (`model.model_config`), an HF
    config.json, or a checkpoint directory."""
    p = resolve_preset(name_or_path)
    if p.is_dir() or p.suffix == ".json":
        from dsv3.config.hf import load_hf_config

        cfg = load_hf_config(p)
        if overrides:
            raise UserError("--set overrides apply to YAML configs, not to config.json")
        return cfg
    data = read_yaml(p)

    if is_mindspore_yaml(data):  # the seed's pretrain / finetune / predict YAML: its model_config and moe_config
        from dsv3.config.mindspore import translate
        from dsv3.config.mindspore_predict import predict_model

        if data.get("run_mode") == "predict":
            data = {"model": predict_model(data, str(p))}
        else:  # as `dsv3 train` reads it; the run settings are not read here
            model_only = {k: data[k] for k in ("model", "moe_config") if k in data}
            data = {"model": translate(model_only, str(p))[0].get("model", {})}  # its notes are about the run: not read here
    data = apply_overrides(data, overrides)
    if "model" not in data:
        raise UserError(f"{p}: no 'model:' section")
    return from_dict(ModelConfig, data["model"], "model")
