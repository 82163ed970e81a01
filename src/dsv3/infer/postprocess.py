"""What `LLMEngine` does after a forward (a mixin): logits processing (min_tokens / grammar masks,
penalties) and sampling with logprobs, incremental detokenisation, prompt logprobs and the
`RequestOutput` of a request."""

from __future__ import annotations

from typing import Optional

import torch

from dsv3.infer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from dsv3.infer import guided
from dsv3.infer.sampling import add_penalties, apply_penalties, make_batch, sample, token_counts, topn_logprobs
from dsv3.infer.scheduler import Chunk, Sequence, Status
from dsv3.kernels.invariant import row_log_softmax


class PostprocessMixin:
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """logits [B,V] fp32 of the last position of each sequence -> one token each (logprobs recorded;
        the caller appends, after anything that still needs the sequences' blocks)."""
        if self.batch_invariant and len(seqs) > 1:  # each row sampled alone: [1,V] shapes whatever the batch
            return [t for r, s in enumerate(seqs) for t in self._sample([s], logits[r : r + 1])]
        raw = logits
        logits, batch = self._process(seqs, logits)
        next_ids = sample(logits, batch)
        n_lp = [s.params.logprobs for s in seqs]
        lp_rows = None
        if any(n is not None for n in n_lp):
            top = max(n or 0 for n in n_lp)
            chosen_lp, rank, top_ids, top_lp = topn_logprobs(raw.log_softmax(-1), next_ids, top)
            lp_rows = (chosen_lp.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist())
        tokens = next_ids.tolist()  # the step's one host sync
        for r, (s, tok) in enumerate(zip(seqs, tokens)):
            if lp_rows is not None and s.logprobs is not None:
                entry = {tid: Logprob(lp, i + 1, self._token_text(tid))
                         for i, (tid, lp) in enumerate(zip(lp_rows[2][r][: s.params.logprobs], lp_rows[3][r][: s.params.logprobs]))}
                entry.setdefault(tok, Logprob(lp_rows[0][r], lp_rows[1][r], self._token_text(tok)))
                s.logprobs.append(entry)
                s.cumulative_logprob += lp_rows[0][r]
        return tokens

    def _process(self, seqs: list[Sequence], logits: torch.Tensor, drafted: Optional[list[int]] = None):
        """Logits [B,V] -> (masked and penalised logits, SamplingBatch): everything before temperature.
        `drafted`: one token proposed past each sequence's end (it counts as generated)."""
        params = [s.params for s in seqs]
        vocab = logits.shape[-1]
        logits = self._mask_logits(seqs, logits, 0 if drafted is None else 1)
        batch = make_batch(params, [s.generator for s in seqs], vocab, logits.device)
        if add_penalties(batch, params, logits.device):
            prompt_counts = token_counts([s.token_ids[: s.num_prompt_tokens] for s in seqs], vocab, logits.device)
            outputs = [s.output_ids + ([drafted[i]] if drafted is not None else []) for i, s in enumerate(seqs)]
            logits = apply_penalties(logits, batch, prompt_counts, token_counts(outputs, vocab, logits.device))
        return logits, batch

    def _mask_logits(self, seqs: list[Sequence], logits: torch.Tensor, ahead: int = 0) -> torch.Tensor:
        """-inf where a token may not come next: stop ids before min_tokens, and what a grammar forbids.
        `ahead`: tokens already proposed past each sequence's end (speculative verification)."""
        rows, cols, g_rows, g_matchers, g_bans = [], [], [], [], []
        for r, s in enumerate(seqs):
            stops = self._stop_ids(s) if s.num_output + ahead < s.params.min_tokens else []  # eos may not end it yet
            if s.guide is not None:
                g_rows.append(r), g_matchers.append(s.guide), g_bans.append(stops)
            elif stops:
                rows += [r] * len(stops)
                cols += stops
        if rows:
            logits = logits.clone()
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
        if g_rows:
            logits, failed = guided.mask_rows(logits, g_rows, g_matchers, g_bans)
            for i, message in failed.items():  # `_append` ends these sequences (nothing else in the batch)
                seqs[g_rows[i]].error = message
        return logits

    def _stop_ids(self, seq: Sequence) -> list[int]:
        return sorted(set(seq.params.stop_token_ids or []) | (set() if seq.params.ignore_eos else self.eos_ids))

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
        lp = row_log_softmax(logits[: len(targets)]) if self.batch_invariant else logits[: len(targets)].log_softmax(-1)
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
                cumulative_logprob=s.cumulative_logprob, error=s.error,
                routed_experts=list(s.routed_experts) if s.routed_experts is not None else None))
        plp = list(req.prompt_logprobs) if req.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), plp, outs, req.finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens or 0,
                             metrics=RequestMetrics(sum(s.spec_drafts for s in req.seqs), sum(s.spec_accepted for s in req.seqs)),
                             weight_version=self.weight_version)
