"""What tensor parallelism does not split: the activations a tp rank keeps whole (`dsv3.parallel.tp`'s plan).

The activation profile (`dsv3.tools.activations`) runs the single-device model; dividing its bytes by
the tensor-parallel degree is right for what the plan splits (sequence-parallel norms and residuals:
Shard(1); heads and MLP columns: Shard(-1)), wrong for what every tp rank holds whole:

* **per decoder / MTP layer** (`replicated_layer_bytes`): the attention input (all-gathered from the
  sequence shards under sequence parallel; without it, `parallel.use_seq_parallel: false`, the trainer's
  default, the whole residual stream and both norms too) (saved by the replicated `q_a_proj` and `kv_a_proj_with_mqa`), the low-rank
  latents those projections make and their norms (replicated modules: every rank computes them over
  the whole sequence), and in a dense layer the MLP input all-gathered (saved by `gate_proj` and
  `up_proj`). Measured by running exactly those modules on fake tensors of the whole sequence.
* **the head and loss** (`vocab_bytes`): `lm_head` is column-parallel with its logits gathered
  (Replicate), so the [tokens, vocab] logits, the loss's fp32 log-softmax and their gradient are whole
  on every rank, for the main head and each MTP head. Found as the part of the last stage's edge
  profile proportional to the vocabulary: the edge is profiled again at half the vocabulary and the
  difference doubled (every other tensor there is independent of the vocabulary size).
"""

from __future__ import annotations

import copy
import warnings

import torch


def replicated_layer_bytes(cfg, layer_id: int, seq_parallel: bool) -> int:
    """Bytes one micro-batch of decoder layer `layer_id` (an MTP layer's id included) keeps for backward
    over the whole sequence in tensors the tp plan replicates (module docstring); every tp rank holds
    them whole, where the profile's division by tp assumed 1/tp of them. Without sequence parallel
    the residual stream is whole too: the layer's output, both norms with their fp32 internals, the
    attention's output added to the residual, and the MLP / MoE input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsv3.model.layers import MLP
    from dsv3.model.transformer import DecoderLayer
    from dsv3.tools.memtrack import TensorMemory, compute_dtype, to_fake

    mc, dtype = cfg.model, compute_dtype(cfg)
    b, T = cfg.train.batch_size, cfg.data.seq_length
    with torch.device("meta"):
        layer = DecoderLayer(mc, layer_id).to(dtype)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    to_fake(layer, fake)
    attn = layer.self_attn
    mode = TensorMemory(meta_routing=True)
    mode.ignore(list(layer.parameters()), list(layer.buffers()))
    with fake:
        cos = torch.zeros(1, T, mc.qk_rope_head_dim // 2, dtype=torch.float32)
        sin = torch.zeros_like(cos)
    with fake, mode:
        whole = lambda: torch.empty(b, T, mc.hidden_size, dtype=dtype, requires_grad=True)
        kept = [whole() for _ in range(1 if seq_parallel else 3)]  # the attention input, or the output, input and residual
        mode.track(kept)
        if seq_parallel:
            x = kept[0]  # gathered from the sequence shards
            mlp_in = whole() if isinstance(layer.mlp, MLP) else None  # the dense MLP's gathered input
        else:
            x, mlp_in = layer.input_layernorm(kept[1]), layer.post_attention_layernorm(kept[2])
        mode.track(mlp_in)
        kept += [x, mlp_in]
        if attn.q_lora_rank is not None:
            kept.append(attn.q_a_layernorm(attn.q_a_proj(x)))  # what q_b_proj saves, and the norm's own inputs
        kept.extend(attn.project_latent(x, cos, sin))  # normalised c_kv (kv_b_proj's input) and the roped k_pe
        live = mode.live["meta"]
    return live


def vocab_bytes(run_edge, cfg) -> tuple[int, int]:
    """(kept, transient) bytes of a last stage's edge (head, MTP heads, loss) proportional to the
    vocabulary: `run_edge(cfg)` profiles that edge of `cfg`; it runs at the model's vocabulary and at
    half of it, and the difference is doubled."""
    half = copy.deepcopy(cfg)
    half.model.vocab_size = cfg.model.vocab_size // 2
    full_k, full_t = run_edge(cfg)
    half_k, half_t = run_edge(half)
    scale = cfg.model.vocab_size / (cfg.model.vocab_size - half.model.vocab_size)
    return max(0, int((full_k - half_k) * scale)), max(0, int((full_t - half_t) * scale))
