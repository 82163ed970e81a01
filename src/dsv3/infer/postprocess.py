"""Turning engine state into outputs (a mixin of `LLMEngine`): incremental detokenisation, prompt
logprobs and the `RequestOutput` of a request."""

from __future__ import annotations

from typing import Optional

import torch

from dsv3.infer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from dsv3.infer.sampling import topn_logprobs
from dsv3.infer.scheduler import Chunk, Sequence, Status


class PostprocessMixin:
    def _detokenize(self, seq: Sequence, tok: int) -> None:
        if self.tokenizer is None:
            return
        if seq.detok is not None:
            piece = seq.detok.step(tok)
        else:  # a tokenizer without a streaming decoder: decode everything (simple, quadratic)
            full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
            piece = full[len(seq.text):] if not full.endswith("\ufffd") else ""
        seq.text += piece
        seq.new_text_len = len(piece)  # the stop-string search only looks at text this token could complete

    def _token_text(self, tok: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _prompt_logprobs(self, req, seq: Sequence, work: Chunk, logits: torch.Tensor) -> None:
        """Logits at positions start..start+T-1 predict tokens start+1..start+T (the last one, if past the
        prompt, is a generated token and is not a prompt logprob)."""
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        n_prompt = seq.num_prompt_tokens
        targets = seq.token_ids[work.start + 1 : min(work.start + work.num_tokens + 1, n_prompt)]
        if not targets:
            return
        lp = logits[: len(targets)].log_softmax(-1)
        tgt = torch.tensor(targets, device=lp.device)
        chosen_lp, rank, top_ids, top_lp = topn_logprobs(lp, tgt, req.params.prompt_logprobs)
        for t, c, r, ids, lps in zip(targets, chosen_lp.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist()):
            entry = {tid: Logprob(v, i + 1, self._token_text(tid)) for i, (tid, v) in enumerate(zip(ids, lps))}
            entry.setdefault(t, Logprob(c, r, self._token_text(t)))
            req.prompt_logprobs.append(entry)
        if len(req.prompt_logprobs) >= n_prompt:
            seq.want_prompt_logprobs = False

    def _output(self, req) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text = s.text
            if s.status is not Status.FINISHED and s.params.stop:
                # Hold back a possible stop-string prefix so cumulative text never shrinks.
                hold = max(len(x) for x in s.params.stop) - 1
                text = text[: max(0, len(text) - hold)]
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=list(s.output_ids),
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                cumulative_logprob=s.cumulative_logprob))
        plp = list(req.prompt_logprobs) if req.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), plp, outs, req.finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens or 0,
                             metrics=RequestMetrics(sum(s.spec_drafts for s in req.seqs), sum(s.spec_accepted for s in req.seqs)))
