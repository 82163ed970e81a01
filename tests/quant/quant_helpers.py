"""Helpers of the quantisation tests (imported by name): a small random model (tiny config, 512-token
vocab, MTP) and plain greedy decoding by full forwards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def small_model(seed: int = 0, **overrides):
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = dataclasses.replace(load_model_config(REPO / "configs" / "tiny.yaml"), **{"vocab_size": 512, **overrides})
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.reset_parameters(std=0.05)
    with torch.no_grad():  # a non-zero router bias, so routing depends on it
        for layer in m.moe_layers():
            layer.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.eval()


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding by full forwards (the model's own maths, no engine)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]
