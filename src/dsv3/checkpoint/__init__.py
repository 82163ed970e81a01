"""HF-format checkpoints: one name table (`hf_map`), streaming load/save (`io`), FP8 (`fp8`), `dsv3 convert`."""

from dsv3.checkpoint.io import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
