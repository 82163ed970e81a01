"""MTP speculative decoding inside `LLMEngine` (a mixin: it uses the engine's runner, sampling
pre-processing and `_append`).

The MTP block drafts one token past each sequence's end; the next decode step verifies
[last token, draft] in one forward. The draft is kept by rejection sampling (greedy rows: iff it is
the argmax), so every token is distributed exactly as without speculation (greedy: identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.infer.routing import keep_routes, wanted
from dsv3.infer.sampling import distribution, race, rejection_sample
from dsv3.infer.scheduler import Sequence, Status


class SpeculativeMixin:
    def _spec_ready(self, seq: Sequence) -> bool:
        """Rows the verify step can take: a draft exists (not for guided or logprobs requests)."""
        return seq.draft is not None and seq.params.logprobs is None and seq.guide is None

    def _draft(self, seqs: list[Sequence], mtp_logits: torch.Tensor) -> None:
        """Draw each live sequence's draft from q, the MTP logits processed exactly as the target's will be
        (masks, penalties, temperature, top-k/p, min-p; greedy rows: one-hot argmax), and keep q."""
        if self.batch_invariant and len(seqs) > 1:  # each row drafted alone (its draws see only itself)
            for r, s in enumerate(seqs):
                self._draft([s], mtp_logits[r : r + 1])
            return
        live = [r for r, s in enumerate(seqs) if s.status is not Status.FINISHED and s.guide is None and s.params.logprobs is None]
        for s in seqs:
            s.draft, s.draft_q = None, None
        if not live:
            return
        seqs = [seqs[r] for r in live]
        logits, batch = self._process(seqs, mtp_logits[live])
        if batch.all_greedy:  # greedy verification needs only the draft (q is one-hot at it)
            for s, d in zip(seqs, logits.argmax(-1).tolist()):
                s.draft = d
            return
        q = distribution(logits, batch)
        for s, d, row in zip(seqs, race(q, batch.generators).tolist(), q):
            s.draft, s.draft_q = d, row

    def _run_speculative(self, seqs: list[Sequence], positions: list[int], tables: list[list[int]]) -> None:
        """MTP speculation: verify [last token, draft] in one forward. The draft is kept by rejection
        sampling (greedy rows: iff it is the argmax), the second position then gives one more token; a
        rejected draft is replaced by a draw from the residual. Each token is distributed exactly as
        without speculation (greedy: identical)."""
        drafts = [s.draft for s in seqs]
        with self.routes.recording(wanted(seqs)):
            logits, hidden = self.runner.decode([[s.token_ids[-1], d] for s, d in zip(seqs, drafts)], positions, tables, return_hidden=True)
        routes = self.routes.take()  # [2B, L, K]: row 2b routes the first position of seqs[b], 2b+1 the draft's
        l1, batch = self._process(seqs, logits[:, 0])
        l2, _ = self._process(seqs, logits[:, 1], drafted=drafts)
        draft_t = torch.tensor(drafts, device=l1.device)
        if batch.all_greedy:  # rejection sampling with one-hot p and q: keep the draft iff it is the argmax
            first, bonus = l1.argmax(-1), l2.argmax(-1)
            accepted = first == draft_t
        else:
            p1, p2 = distribution(l1, batch), distribution(l2, batch)
            q = torch.stack([s.draft_q if s.draft_q is not None else F.one_hot(draft_t[b], p1.shape[-1]).to(p1.dtype)
                             for b, s in enumerate(seqs)])
            accepted, first = rejection_sample(p1, q, draft_t, batch.generators)
            bonus = race(p2, batch.generators)
        rows = torch.stack([accepted.long(), first, bonus], dim=1).tolist()  # the step's one host sync
        # MTP at both positions (the second row is garbage when the draft was rejected, and is
        # overwritten next step); the next draft comes from the last accepted position.
        mtp = self.runner.mtp_decode(hidden, [[t1, t2 if a else 0] for a, t1, t2 in rows], positions, tables)
        self.counters["spec_steps"] += 1
        self.counters["spec_num_draft_tokens"] += len(seqs)
        for b, (s, (a, t1, t2)) in enumerate(zip(seqs, rows)):
            s.spec_drafts += 1
            s.spec_accepted += a
            s.num_computed += 1
            keep_routes([s], routes, [2 * b])
            self._append(s, t1)
            self.counters["decode_tokens"] += 1
            if a:
                self.counters["spec_num_accepted_tokens"] += 1
                if s.status is not Status.FINISHED:
                    s.num_computed += 1
                    keep_routes([s], routes, [2 * b + 1])
                    self._append(s, t2)
                    self.counters["decode_tokens"] += 1
        self._draft(seqs, mtp[torch.arange(len(seqs)), torch.tensor([a for a, _, _ in rows])])
