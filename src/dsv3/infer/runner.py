"""Model execution over the paged latent cache: naive-attention prefill, absorbed-attention decode.

The runner walks the model's own modules (`model.model.layers[i].self_attn.project_q` etc.), so
there is no second copy of the model maths; what it adds is where the latents live (the paged
cache) and the batched absorbed decode (`absorbed_decode`), whose readable reference is
`MLA.attend_absorbed` (tests/infer/test_runner.py compares the two).
"""

from __future__ import annotations

import torch

from dsv3.infer.kv_cache import PagedLatentCache
from dsv3.model.transformer import Transformer


def absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, valid: torch.Tensor,
                    w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row over its cached latents, MQA-style with a single 576-wide KV head.

    q_nope [B,H,P], q_pe [B,H,R], latent [B,S,C+R] = [c_kv | k_pe], valid [B,S] bool (False = padding),
    w_uk [H,P,C], w_uv_t [H,C,V] -> [B, H*V]. Scores and softmax in fp32.
    """
    B, H, _ = q_nope.shape
    C = w_uk.shape[-1]
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B,H,C]: W_UK folded into the query
    q = torch.cat([q_lat, q_pe], dim=-1).float()  # [B,H,C+R]
    lat = latent.float()
    scores = torch.bmm(q, lat.transpose(1, 2)).mul_(scale)  # [B,H,S]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    o_lat = torch.bmm(scores.softmax(-1), lat[..., :C])  # [B,H,C]: values are the latent itself
    o = torch.bmm(o_lat.to(w_uv_t.dtype).transpose(0, 1), w_uv_t)  # [H,B,V]: W_UV applied after the sum
    return o.transpose(0, 1).reshape(B, -1)


class ModelRunner:
    """Runs prefill chunks and decode batches of a `Transformer` against a `PagedLatentCache`."""

    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.device = cache.data.device
        self.kv_lora_rank = model.config.kv_lora_rank
        # Absorbed weights computed once (never per step): W_UK [H,P,C], W_UV^T [H,C,V], contiguous for bmm.
        self.w_uk, self.w_uv_t = [], []
        for layer in model.model.layers:
            w_uk, w_uv = layer.self_attn.absorbed_weights()
            self.w_uk.append(w_uk.detach().contiguous())
            self.w_uv_t.append(w_uv.detach().transpose(1, 2).contiguous())

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h)).float()

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], int, list[int]]], all_logits: list[bool] | None = None) -> list[torch.Tensor]:
        """Packed prefill of several sequences in one forward (weights are read once for all of them).

        chunks: (token_ids, start, block_table) per sequence: compute positions [start, start+T) whose
        first `start` latents are already cached. The T_j tokens are concatenated into one row of N
        tokens; attention runs over every sequence's cached + new latents with a mask that keeps each
        query inside its own sequence and causal. Returns per chunk fp32 logits, [T_j, V] if
        all_logits[j] else [1, V] (its last position).
        """
        m, cache, C, dev = self.model, self.cache, self.kv_lora_rank, self.device
        all_logits = all_logits or [False] * len(chunks)
        ids = self._tensor([[t for ids_, _, _ in chunks for t in ids_]])  # [1,N]
        q_pos, q_seg, new_slots, k_slots, k_pos, k_seg = [], [], [], [], [], []
        for j, (ids_j, start, table) in enumerate(chunks):
            table_t = self._tensor([table])
            pos = torch.arange(start, start + len(ids_j), device=dev)
            keys = torch.arange(start + len(ids_j), device=dev)
            q_pos.append(pos)
            new_slots.append(cache.slots(table_t, pos[None])[0])
            k_slots.append(cache.slots(table_t, keys[None])[0])
            k_pos.append(keys)
            q_seg.append(torch.full_like(pos, j))
            k_seg.append(torch.full_like(keys, j))
        q_pos, new_slots, k_slots = torch.cat(q_pos), torch.cat(new_slots), torch.cat(k_slots)
        mask = (torch.cat(q_seg)[:, None] == torch.cat(k_seg)[None, :]) & (torch.cat(k_pos)[None, :] <= q_pos[:, None])  # [N,S]
        cos, sin = m.rope(q_pos)  # [1,N,R/2]
        h = m.model.embed_tokens(ids)
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q_nope, q_pe = attn.project_q(x, cos, sin)
            c_kv, k_pe = attn.project_latent(x, cos, sin)
            cache.write(i, new_slots, c_kv[0], k_pe[0])
            lat = cache.gather(i, k_slots[None])  # [1,S,C+R]: every sequence's context, new tokens included
            o = attn.attend_naive(q_nope, q_pe, lat[..., :C], lat[..., C:], mask)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        ends = torch.tensor([len(c[0]) for c in chunks]).cumsum(0).tolist()
        rows = [list(range(e - len(c[0]), e)) if a else [e - 1] for c, e, a in zip(chunks, ends, all_logits)]
        logits = self._logits(h[0, self._tensor([r for rs in rows for r in rs])])  # head only where needed
        return list(logits.split([len(r) for r in rows]))

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One new token for each of B sequences (token b at position positions[b]). -> fp32 logits [B, V]."""
        m, cache, C = self.model, self.cache, self.kv_lora_rank
        B = len(token_ids)
        width = max(len(t) for t in tables)
        table_t = self._tensor([t + [0] * (width - len(t)) for t in tables])  # [B,nb], padded with block 0
        pos = self._tensor(positions)  # [B]
        s_max = max(positions) + 1
        key_pos = torch.arange(s_max, device=self.device)[None, :]
        valid = key_pos <= pos[:, None]  # [B,S]
        all_slots = cache.slots(table_t, torch.minimum(key_pos, pos[:, None]))  # padding re-reads a valid slot
        new_slots = cache.slots(table_t, pos[:, None])[:, 0]  # [B]
        cos, sin = m.rope(pos[:, None])  # [B,1,R/2]
        h = m.model.embed_tokens(self._tensor(token_ids)[:, None])  # [B,1,D]
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q_nope, q_pe = attn.project_q(x, cos, sin)  # [B,1,H,*]
            c_kv, k_pe = attn.project_latent(x, cos, sin)  # [B,1,C], [B,1,R]
            cache.write(i, new_slots, c_kv[:, 0], k_pe[:, 0])
            lat = cache.gather(i, all_slots)  # [B,S,C+R]
            o = absorbed_decode(q_nope[:, 0], q_pe[:, 0], lat, valid, self.w_uk[i], self.w_uv_t[i], attn.softmax_scale)
            h = h + attn.o_proj(o)[:, None]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._logits(h[:, 0])
