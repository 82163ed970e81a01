"""Inference: `LLMEngine` (paged latent cache, continuous batching), the offline `LLM`, `SamplingParams`.

Exports are lazy so `import dsv3.infer` does not import torch until something is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LLM": "dsv3.infer.llm",
    "LLMEngine": "dsv3.infer.engine",
    "SamplingParams": "dsv3.infer.sampling",
    "GuidedDecodingParams": "dsv3.infer.sampling",
    "RequestOutput": "dsv3.infer.outputs",
    "CompletionOutput": "dsv3.infer.outputs",
    "Logprob": "dsv3.infer.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv3.infer' has no attribute {name!r}")
