"""A resumable, deterministic batch loader (Megatron's `MegatronPretrainingSampler` semantics).

The GPT dataset is already shuffled, so batches are taken in order: global batch g holds samples
`[g * B * dp, (g + 1) * B * dp)`, and data-parallel rank r gets its r-th slice of B samples. The
position is one number, `consumed_samples` (global, like Megatron's checkpoint field): saving it
and loading it back resumes mid-epoch without repeating or skipping a sample.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts into one dict of batched tensors."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class _BatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, start: int, batch_size: int, dp_rank: int, dp_size: int):
        self.n, self.start, self.b, self.rank, self.dp = n, start, batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        g = self.b * self.dp
        for s in range(self.start, self.n - g + 1, g):  # incomplete global batches are dropped
            lo = s + self.rank * self.b
            yield list(range(lo, lo + self.b))

    def __len__(self) -> int:
        return max(0, (self.n - self.start) // (self.b * self.dp))


class ResumableLoader:
    """Iterate batches (dicts of stacked tensors) of `dataset` in order, resumably.

    `batch_size` is per data-parallel rank (the micro batch); `num_workers` > 0 loads in worker
    processes (order is unchanged). `state_dict()` / `load_state_dict()` save and restore the
    position; iterating again after exhaustion starts over only when `cycle=True`."""

    def __init__(self, dataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0,
                 cycle: bool = False, pin_memory: bool = False):
        if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch_size={batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.cycle, self.pin_memory = num_workers, cycle, pin_memory
        self.consumed_samples = 0  # global samples handed out (all ranks)
        self.epoch = 0  # completed passes (only advances with cycle=True)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size

    def __len__(self) -> int:
        """Batches left in the current pass."""
        return max(0, (len(self.dataset) - self.consumed_samples) // self.global_batch_size)

    def _loader(self) -> DataLoader:
        sampler = _BatchSampler(len(self.dataset), self.consumed_samples, self.batch_size, self.dp_rank, self.dp_size)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=self.pin_memory)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            for batch in self._loader():
                # count the batch before handing it out: a checkpoint taken while the caller
                # holds it records it as consumed, so a resumed run starts with the next one
                self.consumed_samples += self.global_batch_size
                yield batch
            if not self.cycle or len(self.dataset) < self.global_batch_size:
                return
            self.consumed_samples, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "global_batch_size": self.global_batch_size, "dataset_len": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dataset_len", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"loader state is for a dataset of {state['dataset_len']} samples, "
                             f"this one has {len(self.dataset)}")
        self.consumed_samples = int(state["consumed_samples"])
        self.epoch = int(state.get("epoch", 0))
