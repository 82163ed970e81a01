"""Single-device DeepSeek-V3 model maths."""

from dsv3.model.transformer import Transformer

__all__ = ["Transformer"]
