"""The speed paths live in `dsv3.kernels` and reach a model built from plain modules from outside
(`apply_fast_paths`, called by the trainer and the engine): same checkpoint names, same outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dsv3.kernels import apply_fast_paths
from dsv3.kernels.grouped import GroupedExperts
from dsv3.kernels.onednn import OneDNNLinear
from dsv3.model import Transformer
from dsv3.model.moe import Experts

REPO = Path(__file__).resolve().parents[2]


def _tiny(cfg) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(cfg, vocab_size=512))
    m.reset_parameters(std=0.05)
    return m.eval()


def test_model_package_holds_no_speed_paths():
    """dsv3/model/ keeps nn.Linear, the expert loop and the plain head (style.md rule 7)."""
    for f in sorted((REPO / "src" / "dsv3" / "model").glob("*.py")):
        text = f.read_text(encoding="utf-8")
        for word in ("mkldnn", "_grouped_mm", "from dsv3.kernels", "import dsv3.kernels", "matmul import"):
            assert word not in text, f"{f.name} mentions {word}"


def test_fast_paths_keep_names_tensors_and_outputs(tiny_config):
    """Swapping classes in place: identical state_dict keys over the same tensors, every plain
    nn.Linear / Experts swapped (a second call swaps nothing), logits equal to the plain model's."""
    model = _tiny(tiny_config)
    ids = torch.randint(0, 512, (2, 24))
    before = model.state_dict()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        plain = model(ids)
    swapped = apply_fast_paths(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert swapped == {"OneDNNLinear": n_linear, "GroupedExperts": len(model.moe_layers())} and n_linear > 0
    assert not any(type(m) in (nn.Linear, Experts) for m in model.modules())
    assert apply_fast_paths(model) == {"OneDNNLinear": 0, "GroupedExperts": 0}
    with torch.no_grad():
        fast = model(ids)
    assert (fast - plain).abs().max() <= 1e-4 * max(1.0, plain.abs().max().item())


def test_engine_swaps_in_fast_paths_after_quantisation(tiny_config):
    """The engine swaps the fast classes into the dense modules quantisation leaves (int8 keeps the
    router and the head dense) and leaves the quantised modules alone."""
    from dsv3.infer.engine import LLMEngine
    from dsv3.quant import QuantExperts, QuantLinear

    engine = LLMEngine(_tiny(tiny_config), quantization="int8", num_gpu_blocks=8)
    kinds = {type(m) for m in engine.model.modules()}
    assert {QuantLinear, QuantExperts} <= kinds and nn.Linear not in kinds and Experts not in kinds
    assert type(engine.model.lm_head) in (OneDNNLinear, QuantLinear)
    dense = LLMEngine(_tiny(tiny_config), num_gpu_blocks=8).model
    assert type(dense.lm_head) is OneDNNLinear and all(type(m.experts) is GroupedExperts for m in dense.moe_layers())

