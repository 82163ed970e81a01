"""The one dtype table and the one device resolver every entry point uses (training, the engine,
checkpoint loading and conversion, the distributed launch)."""

from __future__ import annotations

import torch

from dsv3.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
"""Dtype names a user may write (config.json's `torch_dtype`, `--dtype`, `dtype=`) -> torch dtype."""


def parse_dtype(dtype: str | torch.dtype | None, default: str = "bfloat16") -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 / None (-> default) -> torch.dtype; UserError naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype if dtype is not None else default).replace("torch.", "")
    if key not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported (choose from {', '.join(sorted(DTYPES))})")
    return DTYPES[key]


def resolve_device(name: str | torch.device | None = "auto", what: str = "device") -> torch.device:
    """'auto' / None -> the first CUDA device when there is one, else the CPU; 'cuda[:N]' on a machine
    without CUDA is a UserError naming `what` (the field or flag it came from)."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} {name!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
    return torch.device(name)
