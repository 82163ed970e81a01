"""The one name table between dsv3 state-dict names and Hugging Face checkpoint names.

Every loader, saver and converter goes through this module (`style.md` §9 rule 8). Our module names
are the HF ones, so most tensors map to themselves. The exceptions, each one row of the tables below:

* Routed experts. We store them stacked, `mlp.experts.gate_proj` [E,I,D], `up_proj` [E,I,D],
  `down_proj` [E,D,I]. The DeepSeek hub checkpoint (and transformers 5.23 `save_pretrained`) stores
  one tensor per expert, `mlp.experts.{e}.gate_proj.weight` [I,D]. transformers' in-memory v5
  layout, `mlp.experts.gate_up_proj` [E,2I,D] (gate rows first) and `mlp.experts.down_proj`
  [E,D,I], is also accepted when reading.
* MTP modules. Ours live at `model.mtp.{k}` (norms, `eh_proj`, `shared_head.norm`) with the decoder
  block under `model.mtp.{k}.block`; HF stores depth k (0-based) as layer `num_hidden_layers + k`
  with the block's tensors directly under it.
* The MTP layer's copies of `embed_tokens` and `shared_head.head`. The hub files hold them, but in
  our model (as in DeepSeek's training, vLLM and transformers' MtpModel) they are TIED to the main
  `model.embed_tokens` and `lm_head`: reading ignores them, writing writes copies of the main ones.
* FP8 block scales (`<weight>_scale_inv`) belong to the weight they follow; the reader consumes them
  while dequantising (`dsv3.checkpoint.fp8`).

`SHARD_DIMS` records, per tensor kind, the dimension tensor parallelism splits (None: replicated),
for the parallel code and the converter to share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from dsv3.config.schema import ModelConfig

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
"""Per-expert SwiGLU matrices, stacked on dim 0 in our model."""

MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
"""Prefixes of the tensors that belong to an MTP module itself (everything else is its block)."""

MTP_TIED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
"""HF MTP-layer copies -> the main tensor they are tied to in our model."""

SCALE_SUFFIX = "_scale_inv"
"""FP8 block-scale tensors: `<name>.weight_scale_inv` next to `<name>.weight`."""

SHARD_DIMS: dict[str, int | None] = {
    # column parallel (split the output rows)
    "q_proj": 0, "q_b_proj": 0, "kv_b_proj": 0, "gate_proj": 0, "up_proj": 0, "embed_tokens": 0, "lm_head": 0,
    # row parallel (split the input columns)
    "o_proj": 1, "down_proj": 1,
    # replicated
    "q_a_proj": None, "kv_a_proj_with_mqa": None, "gate": None, "eh_proj": None,
}
"""Tensor-parallel split dim by module name (norms, router and biases are replicated). Stacked
experts are split along dim 0 (the expert axis) by expert parallelism instead."""

MINDFORMERS_MODULES: dict[str, str] = {
    "feed_forward": "mlp", "attention": "self_attn", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
    "wo": "o_proj", "q2l_proj": "q_a_proj", "l2q_proj": "q_b_proj", "kv2l": "kv_a_proj_with_mqa", "lkv2kv": "kv_b_proj",
    "routed_experts": "experts", "shared_experts": "shared_experts", "lm_head": "lm_head", "router": "gate",
}
"""MindFormers DeepSeek-V3 module names (as the seed's YAMLs use them, e.g. the W8A8
`modules_to_not_convert`) -> ours: `w2` is the down projection, `lkv2kv` the latent -> K/V up-projection."""

QUANT_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                 "down_proj", "eh_proj", "lm_head")
"""Leaf names of the [out, in] matrices a quantisation may convert (never embeddings, norms, the router)."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^model\.mtp\.(\d+)\.(.*)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OUR_EXPERT = re.compile(r"^mlp\.experts\.(gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes in our state dict.

    kind: "tensor" (copy as is), "expert" (row `expert` of the stacked tensor `name`),
    "gate_up" (transformers v5 fused [E,2I,D]: first half -> `name` = ...gate_proj, second -> ...up_proj),
    "tied" (an MTP copy of `name`; ignored on load), "scale" (FP8 scale of HF tensor `name`).
    """

    name: str
    kind: str = "tensor"
    expert: int | None = None


def _layer_rest_from_hf(rest: str) -> Target | tuple[str, str, int | None]:
    """Map the part of an HF name after `model.layers.{i}.`; returns (our_rest, kind, expert)."""
    m = _HF_EXPERT.match(rest)
    if m:
        return f"mlp.experts.{m.group(2)}", "expert", int(m.group(1))
    if rest == "mlp.experts.gate_up_proj":
        return "mlp.experts.gate_proj", "gate_up", None
    return rest, "tensor", None


def from_hf(hf_name: str, cfg: ModelConfig) -> Target | None:
    """HF tensor name -> Target in our state dict, or None if we have no slot for it."""
    if hf_name.endswith(SCALE_SUFFIX):
        return Target(hf_name[: -len(SCALE_SUFFIX)], "scale")
    m = _LAYER.match(hf_name)
    if m is None:
        return Target(hf_name)
    i, rest = int(m.group(1)), m.group(2)
    n = cfg.num_hidden_layers
    if i < n:
        our_rest, kind, e = _layer_rest_from_hf(rest)
        return Target(f"model.layers.{i}.{our_rest}", kind, e)
    k = i - n
    if k >= cfg.num_nextn_predict_layers:
        return None
    if rest in MTP_TIED:
        return Target(MTP_TIED[rest], "tied")
    if rest.startswith(MTP_OWN):
        return Target(f"model.mtp.{k}.{rest}")
    our_rest, kind, e = _layer_rest_from_hf(rest)
    return Target(f"model.mtp.{k}.block.{our_rest}", kind, e)


def to_hf(name: str, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Our state-dict name -> the HF names it is written as: [(hf_name, expert index or None)].

    A stacked expert tensor becomes E per-expert names (the hub layout).
    """
    m = _MTP.match(name)
    if m is not None:
        k, rest = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        rest = rest[len("block."):] if rest.startswith("block.") else rest
    else:
        m = _LAYER.match(name)
        if m is None:
            return [(name, None)]
        prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    em = _OUR_EXPERT.match(rest)
    if em:
        return [(f"{prefix}mlp.experts.{e}.{em.group(1)}.weight", e) for e in range(cfg.n_routed_experts)]
    return [(prefix + rest, None)]


def tied_copies(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(HF name, our main tensor) of every MTP-layer copy the hub format stores."""
    for k in range(cfg.num_nextn_predict_layers):
        for rest, ours in MTP_TIED.items():
            yield f"model.layers.{cfg.num_hidden_layers + k}.{rest}", ours


def hf_only_empty(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Zero-size tensors transformers' model has and ours does not: with n_shared_experts == 0 its
    MoE still builds a shared-expert MLP of width 0. Written on save so transformers loads our files
    without "missing keys"; skipped on load (a zero-size tensor carries nothing)."""
    if cfg.n_shared_experts:
        return
    D = cfg.hidden_size
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    layers += [cfg.num_hidden_layers + k for k in range(cfg.num_nextn_predict_layers)]
    for i in layers:
        p = f"model.layers.{i}.mlp.shared_experts."
        yield p + "gate_proj.weight", (0, D)
        yield p + "up_proj.weight", (0, D)
        yield p + "down_proj.weight", (D, 0)


def is_mtp_hf_name(hf_name: str, cfg: ModelConfig) -> bool:
    """Whether an HF name belongs to an MTP layer (index >= num_hidden_layers)."""
    m = _LAYER.match(hf_name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def shard_dim(name: str) -> int | None:
    """Tensor-parallel split dim of our state-dict tensor `name` (None: replicated)."""
    parts = name.split(".")
    if _OUR_EXPERT.match(".".join(parts[-3:])):
        return 0
    module = parts[-2] if len(parts) >= 2 else parts[-1]
    return SHARD_DIMS.get(module)
