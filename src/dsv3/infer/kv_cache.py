"""Paged latent KV cache for MLA.

Per token per layer the absorbed decode path needs only the normalised latent c_kv (kv_lora_rank
values) and the rotated shared rope key k_pe (qk_rope_head_dim values): 576 values for V3 instead of
the 128 heads x (192 + 128) an expanded cache would hold (`inference.md` §b). The cache is one tensor
[L, num_blocks, block_size, C+R]; a sequence owns a list of blocks (its block table), so sequences of
any length share the pool without padding, and a finished or preempted sequence returns its blocks.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from dsv3.config.schema import ModelConfig


class BlockAllocator:
    """Reference-counted block ids with an automatic prefix cache. Host-side only; the tensors never move.

    A full block whose latents are computed can be registered under its content digest (`block_digest`:
    a keyed BLAKE2b of the parent block's digest and the block's token ids, so it names the whole prefix
    up to the block's end, and a request cannot craft another prefix with the same key).
    When its last user releases it, a registered block stays in the free queue with its contents
    intact: a later sequence with the same prefix takes it back (`share`) instead of recomputing it.
    Allocation takes free blocks from the front of the queue: never-registered blocks first, then
    registered ones in least-recently-released order (LRU eviction, which drops their hash).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # content digest -> block id
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # eviction order

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"need {n} cache blocks, {len(self._free)} free")  # callers check can_allocate first
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict: its contents are about to be overwritten
                self.block_hash[b] = None
                if self.cached.get(h) == b:
                    del self.cached[h]
            self.refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a sequence's tail blocks are evicted before its head
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)  # nothing worth keeping: reuse first

    def share(self, blocks: list[int]) -> None:
        """Take another reference to cached blocks (found by `lookup`)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self._free[b]
            self.refs[b] += 1

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (consecutive hits from the start)."""
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> None:
        if h not in self.cached and self.block_hash[block] is None:
            self.cached[h] = block
            self.block_hash[block] = h


_DIGEST_KEY = os.urandom(32)  # per process: digests cannot be computed (or searched for collisions) offline


def salt_digest(salt: Optional[str]) -> bytes:
    """The parent digest of a sequence's first block: a fixed root, or one per cache salt (a request's
    `cache_salt`, the server's per-API-key scope), so prefixes under different salts never share a block."""
    if salt is None:
        return bytes(32)
    return hashlib.blake2b(b"salt\0" + salt.encode("utf-8", "surrogatepass"), digest_size=32, key=_DIGEST_KEY).digest()


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: keyed BLAKE2b-256 over the parent digest (32 bytes) and the
    block's token ids as int64. Python's `hash` of a tuple was searchable for collisions in CPU-minutes
    (vLLM's CVE-2025-25183): two prompts with one key would share latents and continuations."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=32, key=_DIGEST_KEY).digest()


@dataclass
class CacheInfo:
    block_size: int
    num_blocks: int
    free_blocks: int
    bytes_per_token: int
    bytes_per_token_per_layer: int
    used_blocks: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PagedLatentCache:
    """Block pool of latents: `data[l, block, slot] = [c_kv (C) | k_pe (R)]`; with DeepSeek Sparse
    Attention (V3.2) also `index[l, slot]`, the lightning indexer's key of each token (same slots,
    so prefix caching shares them with the latents)."""

    def __init__(self, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 prefix_caching: bool = False):
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.width = cfg.latent_dim  # C + R
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(num_layers, num_blocks * block_size, self.width, dtype=dtype, device=device)
        self.index_width = cfg.index_head_dim if cfg.sparse_attention else 0
        self.index = (torch.zeros(num_layers, num_blocks * block_size, self.index_width, dtype=dtype, device=device)
                      if self.index_width else None)
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_caching = prefix_caching

    @staticmethod
    def bytes_per_token_per_layer(cfg: ModelConfig, dtype: torch.dtype) -> int:
        width = cfg.latent_dim + (cfg.index_head_dim if cfg.sparse_attention else 0)
        return width * torch.empty((), dtype=dtype).element_size()

    # ---- per-sequence bookkeeping (host)
    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """Extra blocks a table of `have` blocks needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, n: int) -> bool:
        return n <= self.allocator.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place so it holds `num_tokens` tokens (caller checked can_allocate)."""
        table.extend(self.allocator.allocate(self.blocks_needed(num_tokens, len(table))))

    def release(self, table: list[int]) -> None:
        self.allocator.free(table)
        table.clear()

    # ---- automatic prefix caching (full blocks by content digest)
    def block_hashes(self, token_ids: list[int], hashes: list[bytes], num_blocks: int, salt: bytes = bytes(32)) -> list[bytes]:
        """Extend `hashes` (the sequence's, kept across steps) to its first `num_blocks` full blocks;
        `salt` (`salt_digest`) is the first block's parent."""
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(block_digest(hashes[-1] if hashes else salt, token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def admit(self, token_ids: list[int], table: list[int], hashes: list[bytes], use_cache: bool,
              salt: bytes = bytes(32)) -> Optional[int]:
        """Blocks for a sequence that (re)starts: its cached prefix blocks, then fresh ones for the rest.
        -> tokens already in the cache (their latents need no compute), or None if it does not fit now.
        The last token is never taken from the cache: its logits are what the sequence needs next."""
        hits: list[int] = []
        if use_cache and self.prefix_caching:
            hits = self.allocator.lookup(self.block_hashes(token_ids, hashes, (len(token_ids) - 1) // self.block_size, salt))
        need = self.blocks_needed(len(token_ids), len(hits))
        if need > self.allocator.num_free - sum(1 for b in hits if self.allocator.refs[b] == 0):
            return None
        self.allocator.share(hits)
        table.extend(hits)
        table.extend(self.allocator.allocate(need))
        return len(hits) * self.block_size

    def register(self, token_ids: list[int], table: list[int], hashes: list[bytes], first: int, num_computed: int,
                 salt: bytes = bytes(32)) -> int:
        """Register the sequence's full, computed blocks from block `first` on -> the new count registered."""
        if not self.prefix_caching:
            return first
        n = num_computed // self.block_size
        for i, h in enumerate(self.block_hashes(token_ids, hashes, n, salt)[first:], start=first):
            self.allocator.register(table[i], h)
        return max(first, n)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.allocator.cached)

    # ---- device-side addressing
    def slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot of each (row, position). tables [B, nb] int64, positions [B, T] -> [B, T]."""
        block = tables.gather(1, torch.div(positions, self.block_size, rounding_mode="floor"))
        return block * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store new latents. slots [N], c_kv [N, C], k_pe [N, R]."""
        self.data[layer].index_copy_(0, slots, torch.cat([c_kv, k_pe], dim=-1).to(self.data.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Latents at slots [B, S] -> [B, S, C+R] (a copy; padded rows point at any valid slot)."""
        return self.data[layer][slots]

    def write_index(self, layer: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Store new indexer keys (DSA). slots [N], keys [N, E]."""
        self.index[layer].index_copy_(0, slots, keys.to(self.index.dtype))

    def gather_index(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Indexer keys at slots [B, S] -> [B, S, E]."""
        return self.index[layer][slots]

    def info(self) -> CacheInfo:
        per_layer = (self.width + self.index_width) * self.data.element_size()
        return CacheInfo(
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            free_blocks=self.allocator.num_free,
            bytes_per_token=per_layer * self.num_layers,
            bytes_per_token_per_layer=per_layer,
            used_blocks=self.num_blocks - self.allocator.num_free,
        )
