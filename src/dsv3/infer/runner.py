"""Model execution over the paged latent cache: naive-attention prefill, absorbed-attention decode.

The runner walks the model's own modules (`model.model.layers[i].self_attn.project_q` etc.), so
there is no second copy of the model maths; what it adds is where the latents live (the paged
cache) and the batched absorbed decode (`absorbed_decode`), whose readable references are
`MLA.attend_absorbed` and `MLA.attend_naive` (tests/infer/test_infer_engine.py compares them).

Cache layer i < num_hidden_layers belongs to decoder layer i; with MTP speculative decoding the
MTP block has its own cache layer num_hidden_layers (it attends over the sequence like any layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.infer.kv_cache import PagedLatentCache
from dsv3.model.transformer import Transformer


def absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, valid: torch.Tensor,
                    w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float) -> torch.Tensor:
    """T query tokens per row over the row's cached latents, MQA-style with a single 576-wide KV head.

    q_nope [B,T,H,P], q_pe [B,T,H,R], latent [B,S,C+R] = [c_kv | k_pe], valid [B,T,S] bool (False =
    padding or future), w_uk [H,P,C], w_uv_t [H,C,V] -> [B,T,H*V]. Scores and softmax in fp32.
    """
    B, T, H, P = q_nope.shape
    C = w_uk.shape[-1]
    q_lat = torch.bmm(q_nope.reshape(B * T, H, P).transpose(0, 1), w_uk)  # [H,BT,C]: W_UK folded into the query
    q = torch.cat([q_lat.transpose(0, 1).reshape(B, T * H, C), q_pe.reshape(B, T * H, -1)], dim=-1).float()  # [B,TH,C+R]
    lat = latent.float()
    scores = torch.bmm(q, lat.transpose(1, 2)).mul_(scale)  # [B,TH,S]
    scores.masked_fill_(~valid[:, :, None, :].expand(B, T, H, -1).reshape(B, T * H, -1), float("-inf"))
    o_lat = torch.bmm(scores.softmax(-1), lat[..., :C])  # [B,TH,C]: values are the latent itself
    o = torch.bmm(o_lat.to(w_uv_t.dtype).view(B * T, H, C).transpose(0, 1), w_uv_t)  # [H,BT,V]: W_UV after the sum
    return o.transpose(0, 1).reshape(B, T, -1)


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, D] @ weight[V, D]^T. Same as F.linear; on CPU with 2+ rows the product is taken as
    (W @ x^T)^T, which MKL runs ~1.5x faster for a tall 129k-row head at 8 rows and 3-6x faster at
    2-4 rows (F.linear packs the whole head there: the speculative verify step's 2 rows paid it;
    bench/bench_decode.py, docs/inference.md); one row keeps F.linear (a GEMV, as fast)."""
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= 2:
        return (weight @ x.T).T
    return F.linear(x, weight)


@dataclass
class Packed:
    """Addressing of a packed prefill: N new tokens of several sequences, S keys (their whole contexts)."""

    q_pos: torch.Tensor  # [N] absolute positions of the new tokens
    new_slots: torch.Tensor  # [N] cache slots they are written to
    k_slots: torch.Tensor  # [S] cache slots of every sequence's context (new tokens included)
    mask: torch.Tensor  # [N,S] bool: same sequence and key position <= query position
    rows: list[list[int]]  # per chunk, the rows of N whose logits are wanted


class ModelRunner:
    """Runs packed prefills and decode batches of a `Transformer` against a `PagedLatentCache`."""

    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.device = cache.data.device
        self.kv_lora_rank = model.config.kv_lora_rank
        self.n_main = model.config.num_hidden_layers
        # Absorbed weights computed once (never per step): W_UK [H,P,C], W_UV^T [H,C,V], contiguous for bmm.
        self.blocks = list(model.model.layers) + [mod.block for mod in model.model.mtp][: cache.num_layers - self.n_main]
        self.w_uk, self.w_uv_t = [], []
        for block in self.blocks:
            w_uk, w_uv = block.self_attn.absorbed_weights()
            self.w_uk.append(w_uk.detach().contiguous())
            self.w_uv_t.append(w_uv.detach().transpose(1, 2).contiguous())

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Output head on rows x [N,D]; a quantised head (dsv3.quant) runs its own kernel."""
        head = self.model.lm_head
        return head_matmul(x, head.weight) if isinstance(head, torch.nn.Linear) else head(x)

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    # ---- one block (decoder layer or MTP block) over the paged cache
    def _block_prefill(self, i: int, h: torch.Tensor, cos, sin, pk: Packed) -> torch.Tensor:
        block = self.blocks[i]
        attn, C = block.self_attn, self.kv_lora_rank
        x = block.input_layernorm(h)
        q_nope, q_pe = attn.project_q(x, cos, sin)
        c_kv, k_pe = attn.project_latent(x, cos, sin)
        self.cache.write(i, pk.new_slots, c_kv[0], k_pe[0])
        lat = self.cache.gather(i, pk.k_slots[None])  # [1,S,C+R]: every sequence's context, new tokens included
        h = h + attn.o_proj(attn.attend_naive(q_nope, q_pe, lat[..., :C], lat[..., C:], pk.mask))
        return h + block.mlp(block.post_attention_layernorm(h))

    def _block_decode(self, i: int, h: torch.Tensor, cos, sin, new_slots, k_slots, valid) -> torch.Tensor:
        block = self.blocks[i]
        attn = block.self_attn
        x = block.input_layernorm(h)
        q_nope, q_pe = attn.project_q(x, cos, sin)  # [B,T,H,*]
        c_kv, k_pe = attn.project_latent(x, cos, sin)  # [B,T,C], [B,T,R]
        self.cache.write(i, new_slots, c_kv.flatten(0, 1), k_pe.flatten(0, 1))
        lat = self.cache.gather(i, k_slots)  # [B,S,C+R]
        o = absorbed_decode(q_nope, q_pe, lat, valid, self.w_uk[i], self.w_uv_t[i], attn.softmax_scale)
        h = h + attn.o_proj(o)
        return h + block.mlp(block.post_attention_layernorm(h))

    # ---- addressing
    def pack(self, chunks: list[tuple[list[int], int, list[int]]], all_logits: list[bool]) -> Packed:
        """chunks: (token_ids, start, block_table) per sequence; positions [start, start+T) are new."""
        dev, cache = self.device, self.cache
        q_pos, new_slots, k_slots, k_pos, q_seg, k_seg, rows, n = [], [], [], [], [], [], [], 0
        for j, ((ids, start, table), want_all) in enumerate(zip(chunks, all_logits)):
            table_t = self._tensor([table])
            pos = torch.arange(start, start + len(ids), device=dev)
            keys = torch.arange(start + len(ids), device=dev)
            q_pos.append(pos)
            new_slots.append(cache.slots(table_t, pos[None])[0])
            k_slots.append(cache.slots(table_t, keys[None])[0])
            k_pos.append(keys)
            q_seg.append(torch.full_like(pos, j))
            k_seg.append(torch.full_like(keys, j))
            rows.append(list(range(n, n + len(ids))) if want_all else [n + len(ids) - 1])
            n += len(ids)
        q_pos = torch.cat(q_pos)
        mask = (torch.cat(q_seg)[:, None] == torch.cat(k_seg)[None, :]) & (torch.cat(k_pos)[None, :] <= q_pos[:, None])
        return Packed(q_pos, torch.cat(new_slots), torch.cat(k_slots), mask, rows)

    def decode_addressing(self, positions: list[int], tables: list[list[int]], T: int):
        """Rows b compute positions positions[b] .. positions[b]+T-1. -> pos [B,T], new slots [B*T],
        key slots [B,S], valid [B,T,S]."""
        width = max(len(t) for t in tables)
        table_t = self._tensor([t + [0] * (width - len(t)) for t in tables])  # [B,nb], padded with block 0
        pos = self._tensor(positions)[:, None] + torch.arange(T, device=self.device)  # [B,T]
        key_pos = torch.arange(max(positions) + T, device=self.device)[None, :]  # [1,S]
        last = pos[:, -1:]
        valid = key_pos[:, None, :] <= pos[:, :, None]  # [B,T,S]: causal within the row, padding excluded
        k_slots = self.cache.slots(table_t, torch.minimum(key_pos, last))  # padding re-reads a valid slot
        return pos, self.cache.slots(table_t, pos).flatten(), k_slots, valid

    # ---- forwards
    def _mtp_input(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        return post if self.model.config.mtp_hidden == "post_norm" else pre

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], int, list[int]]], all_logits: list[bool] | None = None,
                return_hidden: bool = False):
        """Packed prefill of several sequences in one forward (weights are read once for all of them).

        The T_j new tokens of each chunk are concatenated into one row of N tokens; attention runs over
        every sequence's cached + new latents with a mask that keeps each query inside its own sequence
        and causal. Returns per chunk fp32 logits, [T_j, V] if all_logits[j] else [1, V] (its last
        position); with `return_hidden` also (the Packed addressing, the MTP input hidden [N, D]).
        """
        m = self.model
        pk = self.pack(chunks, all_logits or [False] * len(chunks))
        cos, sin = m.rope(pk.q_pos)  # [1,N,R/2]
        h = m.model.embed_tokens(self._tensor([[t for c in chunks for t in c[0]]]))  # [1,N,D]
        for i in range(self.n_main):
            h = self._block_prefill(i, h, cos, sin, pk)
        post = m.model.norm(h[0])
        flat = [r for rs in pk.rows for r in rs]
        logits = list(self._head(post[self._tensor(flat)]).float().split([len(r) for r in pk.rows]))  # head only where needed
        return (logits, pk, self._mtp_input(h[0], post)) if return_hidden else logits

    @torch.inference_mode()
    def decode(self, token_ids: list[list[int]], positions: list[int], tables: list[list[int]], return_hidden: bool = False):
        """T new tokens for each of B sequences (row b: token_ids[b] at positions[b], positions[b]+1, ...).
        -> fp32 logits [B,T,V] (and the MTP input hidden [B,T,D] with `return_hidden`)."""
        m = self.model
        T = len(token_ids[0])
        pos, new_slots, k_slots, valid = self.decode_addressing(positions, tables, T)
        cos, sin = m.rope(pos)  # [B,T,R/2]
        h = m.model.embed_tokens(self._tensor(token_ids))  # [B,T,D]
        for i in range(self.n_main):
            h = self._block_decode(i, h, cos, sin, new_slots, k_slots, valid)
        post = m.model.norm(h)
        logits = self._head(post.flatten(0, 1)).view(*post.shape[:2], -1).float()
        return (logits, self._mtp_input(h, post)) if return_hidden else logits

    # ---- MTP depth 1 as a drafter: z = block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])) at position i
    def _mtp_embed(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        mod = self.model.model.mtp[0]
        return mod.eh_proj(torch.cat([mod.enorm(self.model.model.embed_tokens(next_ids)), mod.hnorm(hidden)], dim=-1))

    def _mtp_logits(self, z: torch.Tensor) -> torch.Tensor:
        z = self.model.model.mtp[0].shared_head.norm(z)
        return self._head(z.flatten(0, -2)).view(*z.shape[:-1], -1).float()

    @torch.inference_mode()
    def mtp_prefill(self, pk: Packed, hidden: torch.Tensor, next_ids: list[int]) -> torch.Tensor:
        """MTP over the packed positions of a prefill (hidden [N,D], next_ids = token at position+1 per row).
        -> fp32 MTP logits at each chunk's last row [chunks, V]."""
        cos, sin = self.model.rope(pk.q_pos)
        z = self._block_prefill(self.n_main, self._mtp_embed(hidden, self._tensor(next_ids))[None], cos, sin, pk)
        return self._mtp_logits(z[0, self._tensor([rs[-1] for rs in pk.rows])])

    @torch.inference_mode()
    def mtp_decode(self, hidden: torch.Tensor, next_ids: list[list[int]], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """MTP at positions[b] .. +T-1 of each row (hidden [B,T,D]) -> fp32 MTP logits [B,T,V]."""
        pos, new_slots, k_slots, valid = self.decode_addressing(positions, tables, len(next_ids[0]))
        cos, sin = self.model.rope(pos)
        z = self._block_decode(self.n_main, self._mtp_embed(hidden, self._tensor(next_ids)), cos, sin, new_slots, k_slots, valid)
        return self._mtp_logits(z)
