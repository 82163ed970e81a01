"""Typed configuration of the DeepSeek-V3 model.

Field names follow the Hugging Face `config.json` that DeepSeek publishes (they are what the
checkpoint ships), so `from_hf_config` / `to_hf_config` are short explicit maps. Every field has a
docstring (the string literal under it). This module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional


# Sanity ranges of the architecture fields: far beyond any released model (DeepSeek-V3: 61 layers,
# width 7168, 256 experts, vocab 129,280), small enough that a hostile or mistyped config.json
# (num_hidden_layers 1e6, n_routed_experts 1e9) is refused before anything is built or allocated.
MAX_POSITIONS = 1 << 24
LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "moe_layer_freq": (1, 1024),
    "num_attention_heads": (1, 1024),
    "kv_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (0, 4096),
    "qk_rope_head_dim": (2, 4096),
    "v_head_dim": (1, 4096),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "n_routed_experts": (1, 1 << 14),
    "n_shared_experts": (0, 64),
    "n_group": (1, 1 << 14),
    "num_nextn_predict_layers": (0, 16),
    "index_topk": (0, MAX_POSITIONS),
    "index_n_heads": (1, 1024),
    "index_head_dim": (2, 4096),
}
"""field -> (min, max) accepted by ModelConfig (checked in `__post_init__`, so by every loader)."""


def _finite(v, optional: bool = False, positive: bool = True) -> bool:
    if v is None:
        return optional
    return isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if positive else True)


@dataclass
class RopeScaling:
    """YaRN long-context RoPE scaling (`rope_scaling` in HF config.json)."""

    type: Literal["yarn"] = "yarn"
    """Scaling type; only YaRN is used by DeepSeek-V2/V3."""
    factor: float = 40.0
    """Context extension factor `s` (V3: 40)."""
    original_max_position_embeddings: int = 4096
    """Pretraining context length L0 that the correction range is computed from (V3: 4096)."""
    beta_fast: float = 32.0
    """High-rotation boundary of the linear ramp (extrapolated dims)."""
    beta_slow: float = 1.0
    """Low-rotation boundary of the linear ramp (interpolated dims)."""
    mscale: Optional[float] = 1.0
    """YaRN mscale numerator of the cos/sin amplitude (V3: 1.0). None: use the plain YaRN default."""
    mscale_all_dim: Optional[float] = 1.0
    """mscale used for the denominator of the cos/sin amplitude and for the mscale² softmax factor."""
    attention_factor: Optional[float] = None
    """Explicit cos/sin amplitude overriding the mscale ratio (HF `attention_factor`; unset for V3)."""
    truncate: bool = True
    """Round the correction range to whole dims (floor/ceil), as DeepSeek and HF do by default."""

    def __post_init__(self) -> None:
        problems = [f"{k} {getattr(self, k)!r} must be a finite number > 0"
                    for k in ("factor", "beta_fast", "beta_slow", "attention_factor")
                    if not _finite(getattr(self, k), optional=k == "attention_factor")]
        problems += [f"{k} {getattr(self, k)!r} must be a finite number >= 0 (or null)"
                     for k in ("mscale", "mscale_all_dim") if not _finite(getattr(self, k), optional=True, positive=False)
                     or (getattr(self, k) or 0) < 0]
        if not 1 <= self.original_max_position_embeddings <= MAX_POSITIONS:
            problems.append(f"original_max_position_embeddings {self.original_max_position_embeddings} "
                            f"must be in [1, {MAX_POSITIONS}]")
        if problems:
            raise ValueError(problems[0])


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture (HF `config.json` names) plus a few runtime switches."""

    # --- sizes
    vocab_size: int = 129280
    """Rows of the embedding and output head (padded; the tokenizer has 128,815 ids)."""
    hidden_size: int = 7168
    """Model width."""
    intermediate_size: int = 18432
    """Width of the dense SwiGLU MLP used by the first `first_k_dense_replace` layers."""
    moe_intermediate_size: int = 2048
    """Width of each routed expert and of each shared expert."""
    num_hidden_layers: int = 61
    """Decoder layers of the main model (MTP layers come on top)."""
    first_k_dense_replace: int = 3
    """Layers 0..k-1 use the dense MLP, the rest MoE."""
    moe_layer_freq: int = 1
    """A layer at index >= first_k_dense_replace is MoE iff index % moe_layer_freq == 0."""
    # --- attention (MLA)
    num_attention_heads: int = 128
    """Attention heads."""
    q_lora_rank: Optional[int] = 1536
    """Rank of the query down-projection; None (or 0) gives a plain q projection (V2-Lite)."""
    kv_lora_rank: int = 512
    """Rank of the compressed key/value latent c_kv (what the absorbed KV cache stores)."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dims without position encoding."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dims carrying the decoupled (interleaved) RoPE; the key part is shared by all heads."""
    v_head_dim: int = 128
    """Per-head value dims."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: Optional[RopeScaling] = field(default_factory=RopeScaling)
    """YaRN parameters; None means plain RoPE and no mscale² softmax correction."""
    max_position_embeddings: int = 163840
    """Longest context the model supports (V3: 4096 x 40)."""
    # --- DeepSeek Sparse Attention (V3.2; dsv3.model.dsa)
    index_topk: int = 0
    """Keys each query attends to, chosen by the lightning indexer (V3.2: 2048); 0 = dense MLA (V3, V3.1)."""
    index_n_heads: int = 64
    """Indexer heads (V3.2: 64); used only when index_topk > 0."""
    index_head_dim: int = 128
    """Indexer query/key width (V3.2: 128); its first qk_rope_head_dim dims carry (half-split) RoPE."""
    # --- MoE
    n_routed_experts: int = 256
    """Routed experts per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts (always active); their MLP width is n_shared_experts x moe_intermediate_size."""
    num_experts_per_tok: int = 8
    """Routed experts chosen per token (top-k)."""
    n_group: int = 8
    """Expert groups for group-limited routing (contiguous blocks of experts)."""
    topk_group: int = 4
    """Groups a token may route into."""
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Affinity function: sigmoid (V3) or softmax (V2)."""
    topk_method: Literal["noaux_tc", "group_limited_greedy", "greedy"] = "noaux_tc"
    """noaux_tc: a correction bias (aux-loss-free balancing) takes part in expert selection only."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' weights to sum to 1."""
    routed_scaling_factor: float = 2.5
    """Multiplier of the routed experts' weights."""
    aux_loss_alpha: float = 0.0
    """Sequence-wise balance loss factor alpha (training only; V3: 1e-4)."""
    # --- misc
    rms_norm_eps: float = 1e-6
    """Epsilon of the block and final RMSNorms."""
    num_nextn_predict_layers: int = 1
    """Multi-token prediction depth D (MTP modules stored as layers num_hidden_layers + k)."""
    initializer_range: float = 0.006
    """Std of the normal weight init."""
    tie_word_embeddings: bool = False
    """Share the embedding and output head weights (False for V3)."""
    bos_token_id: int = 0
    """Begin-of-sentence id."""
    eos_token_id: int = 1
    """End-of-sentence id (also the EOD separator in pretraining data)."""
    pad_token_id: Optional[int] = None
    """Padding id (not used by the model maths)."""
    torch_dtype: str = "bfloat16"
    """Storage dtype written to config.json."""
    # --- runtime switches (not part of the architecture; not written to HF config.json)
    attn_impl: Literal["naive", "absorb"] = "naive"
    """Attention path for full-sequence forwards: expanded K/V ('naive') or absorbed latent ('absorb')."""
    moe_impl: Literal["grouped", "loop"] = "grouped"
    """Expert path: sort-by-expert grouped compute, or the per-expert reference loop."""
    index_impl: Literal["plain", "hadamard_fp8"] = "plain"
    """DSA indexer scores: plain fp32, or as DeepSeek's reference kernel computes them (q and k rotated by a
    Hadamard transform, then quantised to FP8 per 128 values; needs a power-of-two index_head_dim)."""
    mtp_hidden: Literal["post_norm", "pre_norm"] = "post_norm"
    """Main-model hidden fed to MTP depth 1: after the final norm (vLLM/SGLang/Megatron) or before it (torchtitan)."""

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        self._check_ranges()
        checks = [
            (self.n_routed_experts % self.n_group == 0, f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}"),
            (1 <= self.topk_group <= self.n_group, f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}]"),
            (1 <= self.num_experts_per_tok <= self.n_routed_experts, f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, n_routed_experts={self.n_routed_experts}]"),
            (self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim {self.qk_rope_head_dim} must be even"),
            (0 <= self.first_k_dense_replace <= self.num_hidden_layers, f"first_k_dense_replace {self.first_k_dense_replace} must be in [0, num_hidden_layers]"),
            (self.moe_layer_freq >= 1, "moe_layer_freq must be >= 1"),
            (self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0"),
        ]
        if self.index_topk > 0:
            checks.append((self.q_lora_rank is not None, "index_topk > 0 (sparse attention) needs q_lora_rank (the indexer reads the query latent)"))
            checks.append((self.index_head_dim >= self.qk_rope_head_dim,
                           f"index_head_dim {self.index_head_dim} must be >= qk_rope_head_dim {self.qk_rope_head_dim}"))
        if self.topk_method == "noaux_tc" and self.n_group > 1:
            checks.append(((self.n_routed_experts // self.n_group) >= 2, "noaux_tc group scores need >= 2 experts per group"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def _check_ranges(self) -> None:
        """Sizes within LIMITS, finite positive floats, token ids inside the vocabulary (ValueError)."""
        for name, (lo, hi) in LIMITS.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} {v} is out of range [{lo}, {hi}]")
        if self.q_lora_rank is not None and not 1 <= self.q_lora_rank <= 1 << 16:
            raise ValueError(f"q_lora_rank {self.q_lora_rank} is out of range [1, {1 << 16}] (or null)")
        for name in ("rope_theta", "routed_scaling_factor", "rms_norm_eps"):
            if not _finite(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a finite number > 0")
        for name in ("aux_loss_alpha", "initializer_range"):
            v = getattr(self, name)
            if not (_finite(v, positive=False) and v >= 0):
                raise ValueError(f"{name} {v!r} must be a finite number >= 0")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} must be in [0, vocab_size={self.vocab_size})")

    # derived values
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width (nope + rope)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 whenever YaRN is configured."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, idx: int) -> bool:
        """Whether decoder layer `idx` (MTP layers included) uses MoE."""
        return idx >= self.first_k_dense_replace and idx % self.moe_layer_freq == 0

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek Sparse Attention (V3.2) is on."""
        return self.index_topk > 0

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by the absorbed path: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1·m·ln(s) + 1 (1 when s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
