"""Paged latent KV cache for MLA.

Per token per layer the absorbed decode path needs only the normalised latent c_kv (kv_lora_rank
values) and the rotated shared rope key k_pe (qk_rope_head_dim values): 576 values for V3 instead of
the 128 heads x (192 + 128) an expanded cache would hold (`inference.md` §b). The cache is one tensor
[L, num_blocks, block_size, C+R]; a sequence owns a list of blocks (its block table), so sequences of
any length share the pool without padding, and a finished or preempted sequence returns its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.config.schema import ModelConfig


class BlockAllocator:
    """Free list of block ids. Host-side only; the tensors never move."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"need {n} cache blocks, {len(self._free)} free")  # callers check can_allocate first
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


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
    """Block pool of latents: `data[l, block, slot] = [c_kv (C) | k_pe (R)]`."""

    def __init__(self, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.width = cfg.latent_dim  # C + R
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(num_layers, num_blocks * block_size, self.width, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_token_per_layer(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return cfg.latent_dim * torch.empty((), dtype=dtype).element_size()

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

    def info(self) -> CacheInfo:
        per_layer = self.width * self.data.element_size()
        return CacheInfo(
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            free_blocks=self.allocator.num_free,
            bytes_per_token=per_layer * self.num_layers,
            bytes_per_token_per_layer=per_layer,
            used_blocks=self.num_blocks - self.allocator.num_free,
        )
