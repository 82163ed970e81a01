"""Speed paths kept out of the model's maths (`style.md`): native CPU kernels with runtime ISA dispatch
(`dsv3.kernels.native`) and the torch-level fast paths the trainer and the engine swap into a model
built from plain `nn.Linear` and the reference expert loop."""

from dsv3.kernels.fast_paths import apply_fast_paths

__all__ = ["apply_fast_paths"]
