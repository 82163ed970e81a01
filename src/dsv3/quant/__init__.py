"""Quantised inference: W8A8 (the seed's), weight-only int8 / int4, and FP8 block-scaled weights.

    model = dsv3.from_pretrained(dir, quantization="w8a8")   # or LLM(dir, quantization="int4")
    report = quantize_model(model, QuantConfig.preset("int8"))

Schemes and their reference paths: `schemes`; modules: `modules`; selection: `apply`; on-disk
formats (DeepSeek FP8, dsv3 int8): `stored`.
"""

from dsv3.quant.apply import QuantConfig, QuantReport, quantize_model, resolve, set_reference
from dsv3.quant.modules import QuantExperts, QuantLinear, quant_bytes
from dsv3.quant.schemes import SCHEMES, make_scheme
from dsv3.quant.stored import plan_load, prepare_stored, stored_method

__all__ = ["QuantConfig", "QuantReport", "quantize_model", "resolve", "set_reference", "QuantExperts", "QuantLinear",
           "quant_bytes", "SCHEMES", "make_scheme", "plan_load", "prepare_stored", "stored_method"]
