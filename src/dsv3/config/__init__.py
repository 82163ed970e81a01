"""Typed configs (no torch import here)."""

from dsv3.config.schema import ModelConfig, RopeScaling

__all__ = ["ModelConfig", "RopeScaling"]
