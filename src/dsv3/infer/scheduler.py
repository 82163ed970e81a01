"""Continuous batching: which sequences run in the next engine step.

A running sequence always has `pending = len(token_ids) - num_computed >= 1` tokens whose latents
are not cached yet: one (the token it sampled last) when decoding, more while its prompt is being
prefilled (or recomputed after preemption). Each step is either

* a prefill of up to `chunk_size` prompt tokens, packed from one or more sequences (a long prompt
  is cut into chunks over several steps; short prompts that arrive together share one step), or
* a decode step of every running sequence with exactly one pending token (sequences of any length
  batch together; the paged cache needs no padding).

Prefill goes first (new requests start as soon as a slot is free), as in vLLM's default policy.
When the cache cannot hold the next token of every decoding sequence, the newest sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed from
its prompt plus what it already generated. Nothing fails for lack of cache: `max_model_len` never
exceeds the cache capacity, so one sequence alone always fits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch

from dsv3.infer.kv_cache import PagedLatentCache
from dsv3.infer.outputs import FinishReason, Logprob
from dsv3.infer.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One completion being generated (a request with n > 1 has n of them)."""

    seq_id: int
    request_id: str
    index: int
    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    generator: Optional[torch.Generator] = None
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # results
    text: str = ""
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[FinishReason] = None
    stop_reason: int | str | None = None
    detok: Any = None  # incremental detokenizer state (engine-owned)
    new_text_len: int = 0  # length of the text the newest token added
    draft: Optional[int] = None  # MTP's guess of the token after the last one (speculative decoding)
    draft_q: Any = None  # the distribution [V] the draft was drawn from (rejection sampling needs it)
    want_prompt_logprobs: bool = False
    guide: Any = None  # the grammar matcher of a guided-decoding request (dsv3.infer.guided)
    error: Optional[str] = None  # set when this sequence alone failed (its grammar); it then finishes with 'error'
    # prefix caching: the first block's parent digest (`kv_cache.salt_digest` of the request's cache
    # salt), content digests of the full blocks, how many of the table's blocks are registered, and
    # the prompt tokens the first admission found in the cache (None before it is admitted)
    cache_salt: bytes = bytes(32)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    num_cached_tokens: Optional[int] = None
    # return_routed_experts: [L][K] ids per generated token (None when not asked), and the route of the
    # position whose logits sample the next token (set by the engine before `_append`)
    routed_experts: Optional[list] = None
    pending_route: Optional[list] = None
    # speculative decoding: this sequence's drafts verified and accepted
    spec_drafts: int = 0
    spec_accepted: int = 0

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class Chunk:
    seq: Sequence
    start: int
    num_tokens: int


@dataclass
class Prefill:
    chunks: list[Chunk]


@dataclass
class Decode:
    seqs: list[Sequence]


class Scheduler:
    """FIFO admission, prefill-first steps, preempt-by-recompute when the cache is full."""

    def __init__(self, cache: PagedLatentCache, max_num_seqs: int, chunk_size: int, lookahead: int = 0):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.chunk_size = chunk_size
        self.lookahead = lookahead  # extra slots a decode step may write (the speculative draft)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; the last one is preempted first
        self.num_preemptions = 0
        self.admitting = True  # False while generation is paused: waiting sequences stay waiting
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found there

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's blocks; its full computed blocks stay in the prefix cache."""
        self.register_computed(seq)
        self.cache.release(seq.block_table)
        seq.num_registered = 0

    def register_computed(self, seq: Sequence) -> None:
        """Make the sequence's newly full, computed blocks findable by content (the engine calls this
        after every step for the running sequences, so concurrent requests share a prefix early)."""
        if seq.block_table:
            seq.num_registered = self.cache.register(seq.token_ids, seq.block_table, seq.block_hashes,
                                                     seq.num_registered, seq.num_computed, seq.cache_salt)

    def _admit(self, seq: Sequence) -> bool:
        """Blocks for a waiting sequence, cached prefix blocks first; False if it does not fit yet.
        A request that wants prompt logprobs computes its whole prompt (it needs every position's logits)."""
        use_cache = self.cache.prefix_caching and not seq.want_prompt_logprobs
        cached = self.cache.admit(seq.token_ids, seq.block_table, seq.block_hashes, use_cache, seq.cache_salt)
        if cached is None:
            return False
        seq.num_computed = cached
        seq.num_registered = cached // self.cache.block_size
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = cached
        if use_cache:
            self.prefix_queries += len(seq.token_ids)
            self.prefix_hits += cached
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _try_prefill(self) -> Optional[Prefill]:
        budget, chunks = self.chunk_size, []
        for seq in self.running:  # a chunked prefill in progress goes first
            if seq.pending > 1 and budget:
                chunks.append(Chunk(seq, seq.num_computed, min(seq.pending, budget)))
                budget -= chunks[-1].num_tokens
        while budget and self.admitting and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Admit only when the whole prompt fits, and reserve it now: a prompt never stalls half-done.
            if not self._admit(seq):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, seq.num_computed, min(seq.pending, budget)))
            budget -= chunks[-1].num_tokens
        return Prefill(chunks) if chunks else None

    def _decode(self) -> Optional[Decode]:
        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.pending != 1:
                continue
            need = self.cache.blocks_needed(len(seq.token_ids) + self.lookahead, len(seq.block_table))
            while not self.cache.can_allocate(need) and self.running[-1] is not seq:
                victim = self.running[-1]
                if victim in batch:
                    batch.remove(victim)
                self._preempt(victim)
            if not self.cache.can_allocate(need):
                self._preempt(seq)  # the newest sequence gives way itself
                continue
            self.cache.grow(seq.block_table, len(seq.token_ids) + self.lookahead)
            batch.append(seq)
        return Decode(batch) if batch else None

    def schedule(self) -> Prefill | Decode | None:
        return self._try_prefill() or self._decode()
