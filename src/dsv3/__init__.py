"""dsv3: DeepSeek-V3 in PyTorch (model, checkpoints, training, inference, serving).

Public API:
    model = dsv3.from_pretrained("path/to/hf_dir", dtype="bfloat16", device="cuda")
    logits = model(input_ids)                          # [B, T, vocab] of the main head
    logits, mtp_logits = model(input_ids, return_mtp=True)
    model.save_pretrained("out_dir", max_shard_size="5GB")
    cfg = dsv3.ModelConfig(...)                        # typed architecture config (HF field names)
    llm = dsv3.LLM(...); dsv3.SamplingParams(...)      # offline inference (imports dsv3.infer lazily)

`import dsv3` stays light: torch is imported only when a model is loaded.
"""

from __future__ import annotations

from typing import Any

from dsv3.config.schema import ModelConfig, RopeScaling
from dsv3.errors import UserError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RopeScaling", "UserError", "from_pretrained", "LLM", "SamplingParams", "__version__"]

_LAZY = {"LLM": "dsv3.infer", "SamplingParams": "dsv3.infer"}


def from_pretrained(path, dtype=None, device="cpu", **kwargs):
    """Load an HF-format DeepSeek-V3 checkpoint directory into a `dsv3.model.Transformer` (eval mode).

    dtype: "bfloat16" | "float32" | torch.dtype | None (config.json's dtype); the router bias stays fp32.
    device: where the weights are materialised (loaded shard by shard, no second copy).
    mtp: None (load MTP layers if present) | False (skip) | True (require).
    Runtime switches: attn_impl="naive"|"absorb", moe_impl="grouped"|"loop", mtp_hidden=...
    quantization: None (as stored: FP8 checkpoints stay FP8) | "none" (dequantise) | "w8a8" | "int8" |
    "int4" | "fp8": weights quantised once at load (`dsv3.quant`).
    """
    from dsv3.model.transformer import Transformer

    return Transformer.from_pretrained(path, dtype=dtype, device=device, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
