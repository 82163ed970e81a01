"""The DeepSeek-V3 transformer: decoder layers, MTP modules, and the causal-LM wrapper.

Module names are the HF names (`model.layers.3.self_attn.q_a_proj`, `model.norm`, `lm_head`), so
the checkpoint map (`dsv3.checkpoint.hf_map`) only deals with expert stacking and MTP layers.
Single-device maths only: no torch.distributed here; parallelism is applied from outside.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.moe import Experts, Gate, MoE
from dsv3.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then h + FFN(norm(h)); FFN is a dense MLP or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """MTP output norm (`shared_head.norm`); the head matrix itself is the main `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """Multi-token prediction depth k: z = block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)])).

    The embedding half comes FIRST (what the released weights expect). Embedding and output head are
    shared with the main model.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)

    def forward(self, h, emb, cos, sin, mask=None, kv_cache=None):
        """h [B,T,D] previous depth's hidden, emb [B,T,D] embeddings of the shifted tokens -> [B,T,D]."""
        z = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(z, cos, sin, mask, kv_cache)


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm, and the MTP modules (`model.*` in HF names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM.

    `model(input_ids)` -> logits [B,T,vocab] of the main head. `model(input_ids, return_mtp=True)`
    -> (logits, [mtp_logits_1, ..., mtp_logits_D]) where depth k at position i predicts token i+k+1
    (its input is the sequence shifted left by k; the last k positions have no target).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)

    # ---- init
    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms (LayerNorm biases zero), zeros for the routing bias."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.LayerNorm):  # the DSA indexer's k_norm
                m.reset_parameters()
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(p, 0.0, std)
        self.init_non_persistent_buffers(self.rotary.inv_freq.device)

    @torch.no_grad()
    def init_non_persistent_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the buffers no checkpoint holds: RoPE inverse frequencies and MoE token counts.

        Needed after building on the meta device (`to_empty` or checkpoint loading leaves them empty).
        """
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        self.rotary.inv_freq = RotaryEmbedding(self.config).inv_freq.to(device)
        for moe in self.moe_layers():
            moe.tokens_per_expert = torch.zeros(moe.tokens_per_expert.shape, dtype=torch.float32, device=device)

    # ---- checkpoints (HF format: the model builds itself on the meta device and `dsv3.checkpoint`
    # streams the files into it; the checkpoint code never imports the model class)
    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", mtp: bool | None = None, quantization=None,
                        **runtime) -> "Transformer":
        """Load an HF-format DeepSeek-V3 directory in eval mode, streaming it shard by shard into the
        meta-built model (`dsv3.checkpoint.load.load_checkpoint_into`: no second copy of the weights).

        dtype: None uses config.json's dtype (FP8 checkpoints: bfloat16); the router bias stays fp32.
        mtp: None loads the MTP modules when the checkpoint has them; False skips them (less memory);
        True requires them. `runtime` sets runtime switches of ModelConfig (attn_impl, moe_impl, mtp_hidden, index_impl).
        quantization (`dsv3.quant`): None/"auto" keeps a quantised checkpoint as stored (FP8 stays FP8,
        1 byte per weight) and loads others dense; "none" dequantises; "w8a8" | "int8" | "int4" | "fp8"
        (or a QuantConfig / MindFormers quantization_config dict) quantises once at load.
        """
        import dataclasses
        from pathlib import Path

        from dsv3.checkpoint.load import _DTYPES, load_checkpoint_into, parse_dtype, resolve_config
        from dsv3.checkpoint.reader import CheckpointReader, load_dir_config
        from dsv3.config.hf import RUNTIME_FIELDS

        bad = set(runtime) - set(RUNTIME_FIELDS)
        if bad:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {sorted(bad)}")
        path = Path(path)
        reader = CheckpointReader(path)
        try:
            cfg, skip = resolve_config(path, reader, mtp, **runtime)
            torch_dtype = parse_dtype(dtype, default=cfg.torch_dtype if cfg.torch_dtype in _DTYPES else "bfloat16")
            with torch.device("meta"):
                model = cls(cfg)
            post = None
            if quantization is not None or any(d in ("F8_E4M3", "I8") for _, _, d in reader.meta.values()):
                from dsv3.quant import plan_load

                post = plan_load(model, reader, cfg, load_dir_config(path)[1], quantization)
            # names and shapes from the file headers first: a mismatch is reported before any allocation
            load_checkpoint_into(model, reader, torch_dtype, "meta", skip_mtp_layers=skip, dry_run=True)
            load_checkpoint_into(model, reader, torch_dtype, device, skip_mtp_layers=skip)
        finally:
            reader.close()
        model.init_non_persistent_buffers(device)
        model.config = dataclasses.replace(cfg, torch_dtype=str(torch_dtype).replace("torch.", ""))
        model.name_or_path = str(path)  # as transformers records it: save_pretrained copies this directory's tokenizer
        if post is not None:
            from dsv3.quant import quantize_model

            model.quant_report = quantize_model(model, post)
        return model.eval()

    @classmethod
    def check_checkpoint(cls, path, mtp: bool | None = None, reader=None) -> tuple[ModelConfig, object]:
        """Validate an HF directory without reading tensor data: config, file headers, names, shapes.

        Returns the resolved config and the (open) `CheckpointReader`; raises UserError naming the first problem.
        """
        from pathlib import Path

        from dsv3.checkpoint.load import load_checkpoint_into, resolve_config
        from dsv3.checkpoint.reader import CheckpointReader

        path = Path(path)
        reader = reader or CheckpointReader(path)
        cfg, skip = resolve_config(path, reader, mtp)
        with torch.device("meta"):
            model = cls(cfg)
        load_checkpoint_into(model, reader, torch.float32, "meta", skip_mtp_layers=skip, dry_run=True)
        return cfg, reader

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", mtp_copies: bool = True, tokenizer="auto"):
        """Write this model as an HF-format directory with its tokenizer ("auto": the one of the directory
        it was loaded from; or a path / tokenizer object; None: none); see `dsv3.checkpoint.save.save_pretrained`."""
        from dsv3.checkpoint.save import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, mtp_copies=mtp_copies, tokenizer=tokenizer)

    # ---- pieces the engine and trainer use
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B,T] or [T] -> cos, sin [B|1, T, R/2]."""
        cos, sin = self.rotary(positions)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        return cos, sin

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      kv_caches: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,T] -> (final hidden before the norm, after the norm), both [B,T,D]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions)
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, kv_caches[i] if kv_caches is not None else None)
        return h, self.model.norm(h)

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, kv_caches: Sequence | None = None) -> list[torch.Tensor]:
        """Run the MTP chain. hidden [B,T,D] is the main hidden chosen by `mtp_hidden`; returns the
        un-normed hidden of each depth (depth k uses input_ids shifted left by k, padded with 0)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions)
        outs, h = [], hidden
        for k, mod in enumerate(self.model.mtp, start=1):
            shifted = torch.nn.functional.pad(input_ids[:, k:], (0, k), value=0)
            h = mod(h, self.model.embed_tokens(shifted), cos, sin, mask, kv_caches[k - 1] if kv_caches is not None else None)
            outs.append(h)
        return outs

    def mtp_logits(self, mtp_hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.lm_head(mod.shared_head.norm(h)) for mod, h in zip(self.model.mtp, mtp_hidden)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv_caches: Sequence | None = None, return_mtp: bool = False):
        pre, post = self.hidden_states(input_ids, positions, mask, kv_caches)
        logits = self.lm_head(post)
        if not return_mtp:
            return logits
        h0 = post if self.config.mtp_hidden == "post_norm" else pre
        return logits, self.mtp_logits(self.mtp_hidden(h0, input_ids, positions, mask))

    # ---- bookkeeping
    def moe_layers(self) -> list[MoE]:
        """Every MoE module, main layers first, then MTP blocks."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def indexer_loss(self) -> torch.Tensor | None:
        """Sum of the DSA indexers' KL losses of the last training forward (None without sparse attention training)."""
        losses = [m.indexer_loss for m in self.modules() if isinstance(m, MLA) and m.indexer_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the sequence-wise balance losses of the last training forward (None if disabled)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None
