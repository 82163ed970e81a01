"""The engine's batch-invariant runner (`LLMEngine(..., batch_invariant=True)`): `ModelRunner`'s calls,
each token computed alone over the paged cache (`dsv3.kernels.invariant`).

A prefill chunk's tokens and a decode row's tokens (speculative verification included) run one at a
time, in position order: each writes its latents into its cache slot, then its one query attends
over the latents of positions 0..pos gathered from its block table, in the absorbed form. So the
same token gets the same logits in a batch of one or sixteen, in a chunk of any size, with a cached
prefix or not, and the trainer's scoring (`dsv3.train.score`) computes the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.infer.kv_cache import PagedLatentCache
from dsv3.infer.runner import ModelRunner
from dsv3.kernels.invariant import OneQuery, head_row, mtp_token, token_forward


@dataclass
class TokenAddress:
    """Where one token's latents go (cache slot) and which slots its query reads (positions 0..pos)."""

    pos: int
    slot: torch.Tensor  # [1]
    keys: torch.Tensor  # [S] with S = pos + 1


class PagedLatents:
    """One layer's latents of one token in the paged cache (`invariant.TokenLatents`)."""

    def __init__(self, cache: PagedLatentCache, layer: int, addr: TokenAddress, kv_lora_rank: int):
        self.cache, self.layer, self.addr, self.C = cache, layer, addr, kv_lora_rank

    def append(self, latent: torch.Tensor) -> torch.Tensor:
        self.cache.write(self.layer, self.addr.slot, latent[None, : self.C], latent[None, self.C :])
        return self.cache.gather(self.layer, self.addr.keys[None])  # [1,S,C+R]


@dataclass
class ExactPacked:
    """What `ExactRunner.prefill` hands to `mtp_prefill`: every token's address, and each chunk's last token."""

    addrs: list[TokenAddress]
    last: list[int]


class ExactRunner(ModelRunner):
    """`ModelRunner` with every token computed alone (same arguments and results; see the module docstring)."""

    def __init__(self, model, cache: PagedLatentCache, parallel=None):
        if model.config.index_topk > 0:
            raise ValueError("batch_invariant does not cover DeepSeek Sparse Attention (index_topk > 0)")
        super().__init__(model, cache, parallel)

    def _addresses(self, table: list[int], start: int, count: int) -> list[TokenAddress]:
        bs = self.cache.block_size
        slots = [table[p // bs] * bs + p % bs for p in range(start + count)]
        return [TokenAddress(p, self._tensor([slots[p]]), self._tensor(slots[: p + 1])) for p in range(start, start + count)]

    def _one(self, layer: int, addr: TokenAddress) -> OneQuery:
        return OneQuery(PagedLatents(self.cache, layer, addr, self.kv_lora_rank), self.w_uk[layer], self.w_uv_t[layer])

    def _token(self, token: int, addr: TokenAddress) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the MTP input hidden [1,1,D], the final-normed hidden [1,1,D])."""
        pre, post = token_forward(self.model, token, addr.pos, lambda i: self._one(i, addr), self.blocks[: self.n_main])
        return self._mtp_input(pre, post), post

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """One row's fp32 logits [1,V] (gathered over the vocabulary shards under tensor parallelism)."""
        logits = head_row(self.model, x)
        return logits if self.parallel is None else self.parallel.gather_vocab(logits, self.model.config.vocab_size)

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], int, list[int]]], all_logits: list[bool] | None = None,
                return_hidden: bool = False):
        wants = all_logits or [False] * len(chunks)
        logits, addrs, hidden, last = [], [], [], []
        for (ids, start, table), want in zip(chunks, wants):
            out = []
            for t, (tok, addr) in enumerate(zip(ids, self._addresses(table, start, len(ids)))):
                h, post = self._token(tok, addr)
                if want or t == len(ids) - 1:
                    out.append(self._logits(post))
                addrs.append(addr)
                hidden.append(h[0])
            last.append(len(addrs) - 1)
            logits.append(torch.cat(out))
        return (logits, ExactPacked(addrs, last), torch.cat(hidden)) if return_hidden else logits

    @torch.inference_mode()
    def decode(self, token_ids: list[list[int]], positions: list[int], tables: list[list[int]], return_hidden: bool = False):
        logits, hidden = [], []
        for ids, start, table in zip(token_ids, positions, tables):
            outs = [self._token(tok, addr) for tok, addr in zip(ids, self._addresses(table, start, len(ids)))]
            logits.append(torch.cat([self._logits(post) for _, post in outs]))
            hidden.append(torch.cat([h[0] for h, _ in outs]))
        logits = torch.stack(logits)  # [B,T,V]
        return (logits, torch.stack(hidden)) if return_hidden else logits

    def _mtp_row(self, hidden: torch.Tensor, next_id: int, addr: TokenAddress) -> torch.Tensor:
        """MTP at one position (its latents cached); -> the MTP block's normed hidden [1,1,D]."""
        z = mtp_token(self.model, hidden.view(1, 1, -1), next_id, addr.pos, self._one(self.n_main, addr))
        return self.model.model.mtp[0].shared_head.norm(z)

    @torch.inference_mode()
    def mtp_prefill(self, pk: ExactPacked, hidden: torch.Tensor, next_ids: list[int]) -> torch.Tensor:
        normed = [self._mtp_row(hidden[n], nxt, addr) for n, (nxt, addr) in enumerate(zip(next_ids, pk.addrs))]
        return torch.cat([self._logits(normed[n]) for n in pk.last])

    @torch.inference_mode()
    def mtp_decode(self, hidden: torch.Tensor, next_ids: list[list[int]], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        out = []
        for b, (ids, start, table) in enumerate(zip(next_ids, positions, tables)):
            addrs = self._addresses(table, start, len(ids))
            out.append(torch.cat([self._logits(self._mtp_row(hidden[b, t], nxt, addr)) for t, (nxt, addr) in enumerate(zip(ids, addrs))]))
        return torch.stack(out)
