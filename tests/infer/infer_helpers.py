"""Shared pieces of the inference tests: random transformers checkpoints (the oracle) and greedy runs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from hf_oracle import hf_config, make_hf_checkpoint, randomize_  # noqa: E402  (tests/model/hf_oracle.py)

import dsv3  # noqa: E402
from dsv3.infer.engine import LLMEngine  # noqa: E402
from dsv3.infer.sampling import SamplingParams  # noqa: E402

__all__ = ["LLMEngine", "SamplingParams", "hf_config", "make_hf_checkpoint", "randomize_", "make_pair", "hf_greedy", "engine_greedy", "GREEDY", "tiny_model"]


def GREEDY(n: int) -> SamplingParams:
    """Exactly n greedy tokens (eos masked until n, as transformers' min_new_tokens does)."""
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def make_pair(tmp_path: Path, seed: int = 0, **overrides):
    """(transformers model, our Transformer loaded from its checkpoint through dsv3.from_pretrained)."""
    hf = make_hf_checkpoint(tmp_path, seed=seed, **overrides)
    ours = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    return hf, ours


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], n: int, start_after: dict[int, int] | None = None) -> list[list[int]]:
    """Run prompts through the engine; prompt i is added after `start_after[i]` steps (default: at once)."""
    start_after = start_after or {}
    results: dict[str, list[int]] = {}
    steps = 0
    pending = dict(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if start_after.get(i, 0) <= steps]:
            engine.add_request(str(i), None, pending.pop(i), GREEDY(n))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        steps += 1
    return [results[str(i)] for i in range(len(prompts))]


def tiny_model(vocab_size: int = 256, seed: int = 0, std: float = 0.08):
    """configs/tiny.yaml (with its MTP block) at a small vocabulary, random weights, eval mode."""
    import dataclasses

    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    torch.manual_seed(seed)
    m = Transformer(dataclasses.replace(cfg, vocab_size=vocab_size))
    m.reset_parameters(std=std)
    return m.eval()
