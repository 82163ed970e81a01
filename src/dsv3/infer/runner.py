"""Model execution over the paged latent cache: naive-attention prefill, absorbed-attention decode.

The runner calls the model's own modules: each decoder layer (and the MTP module) runs its own
`forward`, with an attention backend (`PagedPrefill` / `PagedDecode`) passed where the model takes
a KV cache. `MLA.forward` hands the attention to the backend, which writes the new latents into the
paged cache and attends over the sequence's whole context: naive attention (`MLA.attend_naive`) for
prefill, the batched absorbed form (`dsv3.model.mla.absorbed_attention`, reference
`MLA.attend_absorbed`, tests/infer compare them) for decode. So a change to the model's blocks,
MLP/MoE or MTP reaches the engine, and the tensor/expert-parallel sharding of `dsv3.infer.parallel`
(which works on those modules) applies unchanged.

Parallel execution: built with a `ParallelContext` (`dsv3.infer.parallel`), the runner installs the
collectives on its (already sharded) model, and every rank that calls `prefill` / `decode` /
`mtp_*` with the same arguments gets the same full-vocabulary logits back.

Cache layer i < num_hidden_layers belongs to decoder layer i; with MTP speculative decoding the
MTP block has its own cache layer num_hidden_layers (it attends over the sequence like any layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.infer.kv_cache import PagedLatentCache
from dsv3.kernels.head import head_matmul
from dsv3.model.mla import MLA, SparseInputs, absorbed_attention
from dsv3.model.transformer import Transformer


@dataclass
class Packed:
    """Addressing of a packed prefill: N new tokens of several sequences, S keys (their whole contexts)."""

    q_pos: torch.Tensor  # [N] absolute positions of the new tokens
    new_slots: torch.Tensor  # [N] cache slots they are written to
    k_slots: torch.Tensor  # [S] cache slots of every sequence's context (new tokens included)
    mask: torch.Tensor  # [N,S] bool: same sequence and key position <= query position
    rows: list[list[int]]  # per chunk, the rows of N whose logits are wanted


def select_keys(cache: PagedLatentCache, layer: int, attn: MLA, sparse: SparseInputs, new_slots: torch.Tensor,
                k_slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """DeepSeek Sparse Attention over the paged cache: store the new tokens' indexer keys, score every
    visible cached key with the layer's indexer and keep each query's top `index_topk`.
    new_slots [N], k_slots [B,S], visible bool [B,T,S] -> bool [B,T,S]."""
    ix = attn.indexer
    keys = ix.keys(sparse.x, sparse.cos, sparse.sin)  # [B,T,E]
    cache.write_index(layer, new_slots, keys.flatten(0, 1))
    scores = ix.scores(sparse.x, sparse.q_latent, sparse.cos, sparse.sin, cache.gather_index(layer, k_slots))
    return ix.select(scores, visible)


class PagedPrefill:
    """Attention backend of a packed prefill for cache layer `layer`: store the new latents, then naive
    attention over every sequence's cached + new latents under the packed mask."""

    def __init__(self, cache: PagedLatentCache, layer: int, pk: Packed):
        self.cache, self.layer, self.pk = cache, layer, pk

    def attend(self, attn: MLA, q_nope, q_pe, c_kv, k_pe, sparse: SparseInputs | None = None) -> torch.Tensor:
        C = c_kv.shape[-1]
        self.cache.write(self.layer, self.pk.new_slots, c_kv[0], k_pe[0])
        lat = self.cache.gather(self.layer, self.pk.k_slots[None])  # [1,S,C+R]: every sequence's context
        mask = self.pk.mask
        if sparse is not None:
            mask = select_keys(self.cache, self.layer, attn, sparse, self.pk.new_slots, self.pk.k_slots[None], mask[None])[:, None]
        return attn.attend_naive(q_nope, q_pe, lat[..., :C], lat[..., C:], mask)


class PagedDecode:
    """Attention backend of a decode batch for cache layer `layer`: store the new latents, then absorbed
    attention over each row's latents (w_uk / w_uv_t: that layer's absorbed weights, computed once)."""

    def __init__(self, cache: PagedLatentCache, layer: int, new_slots, k_slots, valid, w_uk, w_uv_t):
        self.cache, self.layer = cache, layer
        self.new_slots, self.k_slots, self.valid, self.w_uk, self.w_uv_t = new_slots, k_slots, valid, w_uk, w_uv_t

    def attend(self, attn: MLA, q_nope, q_pe, c_kv, k_pe, sparse: SparseInputs | None = None) -> torch.Tensor:
        self.cache.write(self.layer, self.new_slots, c_kv.flatten(0, 1), k_pe.flatten(0, 1))
        lat = self.cache.gather(self.layer, self.k_slots)  # [B,S,C+R]
        valid = self.valid
        if sparse is not None:
            valid = select_keys(self.cache, self.layer, attn, sparse, self.new_slots, self.k_slots, valid)
        return absorbed_attention(q_nope, q_pe, lat, valid, self.w_uk, self.w_uv_t, attn.softmax_scale)


class ModelRunner:
    """Runs packed prefills and decode batches of a `Transformer` against a `PagedLatentCache`.

    parallel: a `dsv3.infer.parallel.ParallelContext` when `model` holds this rank's shard (see
    `dsv3.infer.parallel.shard_model` / `load_sharded`); the runner installs the collectives (after
    any quantisation, which replaces modules) and gathers the vocab-parallel head, so every rank
    returns the same full logits for the same call. None: one process.
    """

    def __init__(self, model: Transformer, cache: PagedLatentCache, parallel=None):
        self.model = model
        self.cache = cache
        self.parallel = parallel
        if parallel is not None:
            parallel.install(model)
        self.device = cache.data.device
        self.kv_lora_rank = model.config.kv_lora_rank
        self.n_main = model.config.num_hidden_layers
        self.blocks = list(model.model.layers) + [mod.block for mod in model.model.mtp][: cache.num_layers - self.n_main]
        self.refresh_weights()

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """(Re)compute what the runner derives from the weights: the absorbed MLA weights, once (never
        per step; again after `LLMEngine.update_weights`): W_UK [H,P,C], W_UV^T [H,C,V], contiguous for bmm."""
        self.w_uk, self.w_uv_t = [], []
        for block in self.blocks:
            w_uk, w_uv = block.self_attn.absorbed_weights()
            self.w_uk.append(w_uk.detach().contiguous())
            self.w_uv_t.append(w_uv.detach().transpose(1, 2).contiguous())

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Output head on rows x [N,D]; a quantised head (dsv3.quant) runs its own kernel."""
        head = self.model.lm_head
        logits = head_matmul(x, head.weight) if isinstance(head, torch.nn.Linear) else head(x)
        return logits if self.parallel is None else self.parallel.gather_vocab(logits, self.model.config.vocab_size)

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    # ---- attention backends of one step, per cache layer
    def _prefill_backend(self, i: int, pk: Packed) -> PagedPrefill:
        return PagedPrefill(self.cache, i, pk)

    def _decode_backend(self, i: int, new_slots, k_slots, valid) -> PagedDecode:
        return PagedDecode(self.cache, i, new_slots, k_slots, valid, self.w_uk[i], self.w_uv_t[i])

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
            h = self.blocks[i](h, cos, sin, None, self._prefill_backend(i, pk))
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
            h = self.blocks[i](h, cos, sin, None, self._decode_backend(i, new_slots, k_slots, valid))
        post = m.model.norm(h)
        logits = self._head(post.flatten(0, 1)).view(*post.shape[:2], -1).float()
        return (logits, self._mtp_input(h, post)) if return_hidden else logits

    # ---- MTP depth 1 as a drafter: the model's MTPModule at position i takes (h_i, emb(t_{i+1}))
    def _mtp_logits(self, z: torch.Tensor) -> torch.Tensor:
        z = self.model.model.mtp[0].shared_head.norm(z)
        return self._head(z.flatten(0, -2)).view(*z.shape[:-1], -1).float()

    @torch.inference_mode()
    def mtp_prefill(self, pk: Packed, hidden: torch.Tensor, next_ids: list[int]) -> torch.Tensor:
        """MTP over the packed positions of a prefill (hidden [N,D], next_ids = token at position+1 per row).
        -> fp32 MTP logits at each chunk's last row [chunks, V]."""
        m = self.model
        cos, sin = m.rope(pk.q_pos)
        emb = m.model.embed_tokens(self._tensor([next_ids]))  # [1,N,D]
        z = m.model.mtp[0](hidden[None], emb, cos, sin, None, self._prefill_backend(self.n_main, pk))
        return self._mtp_logits(z[0, self._tensor([rs[-1] for rs in pk.rows])])

    @torch.inference_mode()
    def mtp_decode(self, hidden: torch.Tensor, next_ids: list[list[int]], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """MTP at positions[b] .. +T-1 of each row (hidden [B,T,D]) -> fp32 MTP logits [B,T,V]."""
        m = self.model
        pos, new_slots, k_slots, valid = self.decode_addressing(positions, tables, len(next_ids[0]))
        cos, sin = m.rope(pos)
        emb = m.model.embed_tokens(self._tensor(next_ids))  # [B,T,D]
        z = m.model.mtp[0](hidden, emb, cos, sin, None, self._decode_backend(self.n_main, new_slots, k_slots, valid))
        return self._mtp_logits(z)
