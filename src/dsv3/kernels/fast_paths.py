"""`apply_fast_paths(model)`: the trainer and the engine swap the speed paths into a model that
`dsv3.model` builds from plain `nn.Linear`s and the readable `Experts`, as `dsv3.quant.quantize_model`
swaps in quantised modules (style.md: performance plumbing lives outside the maths)."""

from __future__ import annotations

from torch import nn

from dsv3.kernels.grouped import GroupedExperts
from dsv3.kernels.onednn import OneDNNLinear
from dsv3.model.moe import Experts

SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: OneDNNLinear, Experts: GroupedExperts}
"""Plain class -> its fast subclass (same parameters and buffers, a faster `forward` / `run_sorted`)."""


def apply_fast_paths(model: nn.Module) -> dict[str, int]:
    """Give every module whose class is exactly a key of `SWAPS` its fast subclass, in place; returns
    how many modules of each fast class. Only the class changes: the same objects, parameters,
    buffers and hooks, so state_dict keys (checkpoints), tensor/expert-parallel sharding and
    quantisation (which match `nn.Linear` / `Experts` by isinstance) see the model they saw before.
    Subclasses (quantised, FP8, expert-parallel modules) keep their own paths, and a second call
    changes nothing. Call before FSDP wraps the modules (it swaps their classes too)."""
    swapped = {fast.__name__: 0 for fast in SWAPS.values()}
    for mod in model.modules():
        fast = SWAPS.get(type(mod))
        if fast is not None:
            mod.__class__ = fast
            swapped[fast.__name__] += 1
    return swapped
