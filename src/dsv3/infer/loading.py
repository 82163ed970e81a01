"""Loading helpers of the engine and its entry points: device and dtype defaults, the model and
tokenizer of a checkpoint directory, one-time quantisation, prompt encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsv3.devices import DTYPES, resolve_device


def default_device() -> torch.device:
    return resolve_device("auto")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slower than fp32 on most machines)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def encode_text(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    """Encode with either the dsv3 tokenizer (`encode(text, add_bos=)`) or a transformers one."""
    try:
        return list(tokenizer.encode(text, add_bos=add_bos))
    except TypeError:
        return list(tokenizer.encode(text, add_special_tokens=add_bos))


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, mtp: bool = False, quantization=None):
    """A `Transformer` from a checkpoint directory, via the checkpoint package's loader (the MTP
    modules only when speculative decoding uses them; quantised once at load when asked)."""
    import dsv3

    return dsv3.from_pretrained(model_dir, dtype=dtype, device=device, mtp=True if mtp else False, quantization=quantization)


def quantize_once(model, quantization):
    """Quantise a model handed to the engine (a loaded one already is: `dsv3.from_pretrained(quantization=)`)."""
    if quantization is None or quantization == "none":
        return getattr(model, "quant_report", None)
    from dsv3.quant import quantize_model, resolve

    if getattr(model, "quantization", None) is not None:
        raise ValueError("the model is already quantised; pass quantization only once")
    return quantize_model(model, resolve(quantization))


def load_tokenizer_for(model_dir: str | Path | None, tokenizer: Any = None):
    """The tokenizer for `model_dir` by the one rule every entry point uses (`dsv3.data.tokenizer.resolve_tokenizer`)."""
    from dsv3.data.tokenizer import resolve_tokenizer

    return resolve_tokenizer(tokenizer, model_dir)
