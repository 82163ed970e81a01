"""The inference engine: requests in, `RequestOutput`s out, one scheduler iteration per `step()`.

Only the engine touches the model and the device; the offline `LLM`, `dsv3 generate` and the
OpenAI server all drive the same `LLMEngine`:

    engine.add_request("r1", "Hello", None, SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

Thread safety: `add_request` / `abort_request` may be called from any thread; they validate and
tokenize in the caller's thread (errors are raised there, for that request only) and hand the
request to the stepping thread through a locked queue. `step()` must run in one thread.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Optional, Sequence as Seq

import torch

from dsv3.config.schema import ModelConfig
from dsv3.infer import guided
from dsv3.infer.control import ControlMixin
from dsv3.infer.exact import ExactRunner
from dsv3.infer.kv_cache import PagedLatentCache, salt_digest
from dsv3.infer.loading import (default_device, encode_text, load_model, load_tokenizer_for,  # noqa: F401 (re-exported)
                                quantize_once, resolve_dtype)
from dsv3.infer.outputs import RequestOutput
from dsv3.infer.postprocess import PostprocessMixin
from dsv3.infer.routing import MAX_ROUTED_EXPERT_IDS, RouteCapture, keep_routes, wanted
from dsv3.infer.runner import ModelRunner
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.scheduler import Decode, Prefill, Scheduler, Sequence, Status
from dsv3.infer.speculation import SpeculativeMixin
from dsv3.kernels import apply_fast_paths

DEFAULT_CPU_CACHE_BYTES = 1 << 30  # CPU: 1 GiB of latents unless told otherwise
DEFAULT_GPU_CACHE_FRACTION = 0.5  # CUDA: this share of the free memory after loading the model


class _Request:
    """A request's shared state: its n sequences and (once computed) prompt logprobs."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.prompt_logprobs: Optional[list] = None

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)


class LLMEngine(SpeculativeMixin, PostprocessMixin, ControlMixin):
    """Continuous-batching engine over a paged latent (absorbed-MLA) KV cache.

    model: a `dsv3.model.Transformer` (already on `device`, in `dtype`). tokenizer: anything with
    `encode`/`decode` (the dsv3 tokenizer, or a transformers tokenizer), or None for token-id use.
    max_num_seqs: sequences decoded together. max_model_len: longest prompt + output (default: the
    model's max_position_embeddings, capped by the cache). block_size: tokens per cache block.
    num_gpu_blocks: cache blocks (default: from `cache_bytes`, else 1 GiB on CPU / half the free
    memory on CUDA). max_num_batched_tokens: most prompt tokens per prefill step (several prompts
    are packed into one step; longer ones are chunked). quantization: "w8a8" | "int8" | "int4" | "fp8" (or a
    `dsv3.quant.QuantConfig` / MindFormers quantization_config dict) quantises the model's linears once,
    in place (`dsv3.quant`); None keeps it as given. speculative: MTP speculative decoding (the MTP
    block drafts one token, the next decode step verifies it: greedy output identical to plain greedy,
    sampled output distributed exactly as without it, by rejection sampling). enable_prefix_caching:
    reuse the cached latents of full blocks whose token prefix was seen before (`kv_cache.py`).
    parallel: a `dsv3.infer.parallel.ParallelContext` to run this rank's share of a tensor/expert-parallel
    model (a full model is cut to the rank's slices here; give `num_gpu_blocks` equal on every rank).
    batch_invariant: every token computed alone (`dsv3.infer.exact`), and each row sampled alone: a
    request's tokens and logprobs are the same bits whatever else is batched, however its prompt is
    chunked, with or without a cached prefix, and equal to the trainer's `dsv3.train.score` (off by
    default: it gives up batching; docs/inference.md).
    max_routed_expert_ids: most expert ids one `return_routed_experts` request may ask for (`dsv3.infer.routing`).
    """

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 8, max_model_len: Optional[int] = None,
                 block_size: int = 16, num_gpu_blocks: Optional[int] = None, cache_bytes: Optional[int] = None,
                 max_num_batched_tokens: int = 2048, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, speculative: bool = False, quantization=None,
                 enable_prefix_caching: bool = True, parallel=None, batch_invariant: bool = False,
                 max_routed_expert_ids: int = MAX_ROUTED_EXPERT_IDS):
        cfg: ModelConfig = model.config
        if parallel is not None and getattr(model, "parallel", None) is None:
            from dsv3.infer.parallel import shard_model

            shard_model(model, parallel)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = resolve_dtype(dtype, self.device) if dtype is not None else next(model.parameters()).dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.quant_report = quantize_once(self.model, quantization)
        apply_fast_paths(self.model)  # the dense modules quantisation left
        self.model_config = cfg
        self.tokenizer = tokenizer
        if max_num_seqs < 1 or block_size < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs, block_size and max_num_batched_tokens must be >= 1")
        if speculative and not len(getattr(model.model, "mtp", [])):
            raise ValueError("speculative decoding needs the model's MTP module (num_nextn_predict_layers >= 1, MTP weights loaded)")
        self.speculative = speculative
        self.batch_invariant = batch_invariant
        cache_layers = cfg.num_hidden_layers + (1 if speculative else 0)  # the MTP block has its own cache layer
        per_token = PagedLatentCache.bytes_per_token_per_layer(cfg, self.dtype) * cache_layers
        if num_gpu_blocks is None:
            if cache_bytes is None:
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    cache_bytes = int(free * DEFAULT_GPU_CACHE_FRACTION)
                else:
                    want = max_num_seqs * (max_model_len or cfg.max_position_embeddings) * per_token
                    cache_bytes = min(DEFAULT_CPU_CACHE_BYTES, want)
            num_gpu_blocks = max(1, cache_bytes // (per_token * block_size))
        self.cache = PagedLatentCache(cfg, cache_layers, num_gpu_blocks, block_size, self.dtype, self.device,
                                      prefix_caching=enable_prefix_caching)
        capacity = num_gpu_blocks * block_size
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, capacity)
        if max_model_len is not None and max_model_len > capacity:
            raise ValueError(f"max_model_len {max_model_len} exceeds the KV cache capacity of {capacity} tokens "
                             f"({num_gpu_blocks} blocks of {block_size}); give more cache (num_gpu_blocks / cache_bytes)")
        self.runner = (ExactRunner if batch_invariant else ModelRunner)(self.model, self.cache, parallel=parallel)
        self.routes = RouteCapture(self.model, max_routed_expert_ids)  # return_routed_experts (`dsv3.infer.routing`)
        # speculation writes one position past the last token (the draft): decode reserves that slot
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, lookahead=1 if speculative else 0)
        self.eos_ids = {cfg.eos_token_id}
        tok_eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        if tok_eos is None and tokenizer is not None:
            tok_eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            self.eos_ids.add(tok_eos)
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._new: list[_Request] = []
        self._aborts: list[str] = []
        self._seq_ids = itertools.count()
        self._grammars: Optional[guided.GrammarCompiler] = None  # built on the first guided request
        self._init_control()  # weight version, pause state (`control.py`)
        self.counters = {"prefill_steps": 0, "decode_steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "spec_steps": 0,
                         "spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0}

    # ---- construction from a checkpoint directory
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer=None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, **engine_kwargs) -> "LLMEngine":
        """Load an HF-format (or dsv3) checkpoint directory; the tokenizer defaults to the one inside it."""
        dev = torch.device(device) if device is not None else default_device()
        dt = resolve_dtype(dtype, dev)
        quantization = engine_kwargs.pop("quantization", None)
        mtp = bool(engine_kwargs.get("speculative"))
        parallel = engine_kwargs.get("parallel")
        if parallel is not None and parallel.world > 1:  # each rank reads only its slices; quantised after
            from dsv3.infer.parallel_load import load_sharded

            model = load_sharded(model_dir, parallel, dt, dev, mtp=True if mtp else False)
            engine_kwargs["quantization"] = quantization
        else:
            model = load_model(model_dir, dt, dev, mtp=mtp, quantization=quantization)
        return cls(model, load_tokenizer_for(model_dir, tokenizer), device=dev, dtype=dt, **engine_kwargs)

    # ---- requests
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Prompt text -> ids (BOS first, as the DeepSeek-V3 tokenizer config asks)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass prompt_token_ids instead of a text prompt")
        return encode_text(self.tokenizer, text, add_bos)

    def add_request(self, request_id: str, prompt: Optional[str] = None, prompt_token_ids: Optional[list[int]] = None,
                    params: Optional[SamplingParams] = None, cache_salt: Optional[str] = None) -> None:
        """Queue a request. Raises ValueError (for this request only) on bad input. `cache_salt` (vLLM's
        name): the request shares prefix-cache blocks only with requests of the same salt."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be None or a non-empty string, got {cache_salt!r:.60}")
        vocab = self.model_config.vocab_size
        params.validate(vocab)
        if params.return_routed_experts:
            self.routes.check(params.n * params.max_tokens, f"n {params.n} x max_tokens {params.max_tokens} =")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_token_ids")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine's max_model_len is {self.max_model_len} "
                             f"(prompt + at least one new token must fit)")
        req = _Request(request_id, prompt, ids, params)
        salt = salt_digest(cache_salt)
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed + i)
            seq = Sequence(next(self._seq_ids), request_id, i, params, list(ids), len(ids), gen, cache_salt=salt)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            seq.want_prompt_logprobs = params.prompt_logprobs is not None and i == 0
            seq.routed_experts = [] if params.return_routed_experts else None
            if params.guided_decoding is not None:
                seq.guide = self._grammar_matcher(params, self._guide_budget(params, len(ids)))
            if self.tokenizer is not None and hasattr(self.tokenizer, "incremental_decoder"):
                seq.detok = self.tokenizer.incremental_decoder(params.skip_special_tokens)
            req.seqs.append(seq)
        with self._lock:
            if request_id in self._requests or any(r.request_id == request_id for r in self._new):
                raise ValueError(f"request id {request_id!r} is already in use")
            self._new.append(req)

    def _grammar_compiler(self) -> guided.GrammarCompiler:
        if self._grammars is None:
            self._grammars = guided.GrammarCompiler(self.tokenizer, self.model_config.vocab_size, list(self.eos_ids))
        return self._grammars

    def _grammar_matcher(self, params: SamplingParams, budget: Optional[int] = None):
        """A fresh matcher of the request's grammar (compiled once per grammar and budget, then copied)."""
        return self._grammar_compiler().matcher(params.guided_decoding, budget)

    def prepare_guided(self) -> None:
        """Build what guided decoding needs before the first guided request (`GrammarCompiler.prepare`)."""
        self._grammar_compiler().prepare()

    def _guide_budget(self, params: SamplingParams, num_prompt_tokens: int) -> int:
        """Tokens a sequence may write: guided JSON is narrowed to close within them."""
        return min(params.max_tokens, self.max_model_len - num_prompt_tokens)

    def abort_request(self, request_id: str | Seq[str]) -> None:
        """Stop a request; its blocks are freed at the start of the next step, which reports it as 'abort'."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            self._aborts.extend(ids)

    def recompute_running(self) -> None:
        """After `step()` raised: send every running sequence back to be recomputed from its tokens (the
        failed step may have left its cached latents or counters half-updated), so stepping can go on."""
        for seq in list(self.scheduler.running):
            self.scheduler._preempt(seq)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests or self._new or self._aborts)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests) + len(self._new)

    def stats(self) -> dict:
        """Counters since start: steps and tokens computed, prefix-cache lookups (prefix_cache_queries: tokens
        looked up, prefix_cache_hits: tokens found), speculative drafts (spec_num_draft_tokens verified,
        spec_num_accepted_tokens accepted), preemptions, cached blocks now; with several processes `ranks`:
        each rank's pid, weight_bytes, cache_bytes, forward_calls and requests (as of the last ping)."""
        sch = self.scheduler
        out = {**self.counters, "prefix_cache_queries": sch.prefix_queries, "prefix_cache_hits": sch.prefix_hits,
               "num_preemptions": sch.num_preemptions, "prefix_cached_blocks": self.cache.num_cached_blocks}
        if hasattr(self.runner, "ranks"):
            out["ranks"] = list(self.runner.ranks)
        return out

    def shutdown(self) -> None:
        """Stop the follower processes of a multi-process engine (no-op for one process)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    def cache_info(self) -> dict:
        """block_size, num_blocks, free_blocks, used_blocks, bytes_per_token(_per_layer)."""
        return self.cache.info().as_dict()

    # ---- the loop
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration (a prefill chunk or a decode step); outputs of requests that progressed."""
        touched: dict[str, _Request] = {}
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, []
            for req in new:
                self._requests[req.request_id] = req
        for req in new:
            for seq in req.seqs:
                self.scheduler.add(seq)
        for rid in aborts:
            req = self._requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                if seq.status is not Status.FINISHED:
                    self.scheduler.remove(seq)
                    self._finish(seq, "abort")
            touched[rid] = req
        work = self.scheduler.schedule() if self.paused != "keep" else None  # "keep": the running ones frozen
        self._note_requests()
        with torch.inference_mode():
            if isinstance(work, Prefill):
                self._run_prefill(work, touched)
            elif isinstance(work, Decode):
                self._run_decode(work, touched)
        for seq in self.scheduler.running:  # newly full blocks become shareable at once
            self.scheduler.register_computed(seq)
        outputs = [self._output(req) for req in touched.values()]
        self._note_requests()
        with self._lock:
            for req in touched.values():
                if req.finished:
                    self._requests.pop(req.request_id, None)
        return outputs

    def _note_requests(self) -> None:
        """Tell a multi-process runner (`executor.DriverRunner`) which requests hold cache now."""
        if hasattr(self.runner, "step_requests"):
            self.runner.step_requests = sorted({s.request_id for s in self.scheduler.running})

    def _run_prefill(self, work: Prefill, touched: dict) -> None:
        chunks = work.chunks
        wants = [c.seq.want_prompt_logprobs for c in chunks]
        inputs = [(c.seq.token_ids[c.start : c.start + c.num_tokens], c.start, c.seq.block_table) for c in chunks]
        with self.routes.recording(wanted(c.seq for c in chunks)):
            if self.speculative:
                logits, packed, hidden = self.runner.prefill(inputs, wants, return_hidden=True)
            else:
                logits = self.runner.prefill(inputs, wants)
        done, last, rows, end = [], [], [], 0
        for c, lg, want in zip(chunks, logits, wants):
            c.seq.num_computed += c.num_tokens
            end += c.num_tokens
            if want:
                self._prompt_logprobs(self._requests[c.seq.request_id], c.seq, c, lg)
            if c.seq.pending == 0:  # the whole prompt is cached: sample its first new token
                done.append(c.seq)
                last.append(lg[-1:])
                rows.append(end - 1)  # its last position's row of the packed tokens
        keep_routes(done, self.routes.take(), rows)
        self.counters["prefill_steps"] += 1
        self.counters["prefill_tokens"] += sum(c.num_tokens for c in chunks)
        new = dict(zip((s.seq_id for s in done), self._sample(done, torch.cat(last)) if done else []))
        if self.speculative:
            # MTP over the same positions: position i takes (hidden_i, token_{i+1}); the last token of a
            # finished prompt is the one just sampled. Its logits at the last position are the draft.
            next_ids = [t for c in chunks for t in (c.seq.token_ids + [new.get(c.seq.seq_id, -1)])[c.start + 1 : c.start + c.num_tokens + 1]]
            mtp = self.runner.mtp_prefill(packed, hidden, next_ids)
        for seq in done:
            self._append(seq, new[seq.seq_id])
            touched[seq.request_id] = self._requests[seq.request_id]
        if self.speculative:
            for c in chunks:
                c.seq.draft = None
            rows = [j for j, c in enumerate(chunks) if c.seq.seq_id in new]
            self._draft([chunks[j].seq for j in rows], mtp[rows] if rows else mtp[:0])

    def _run_decode(self, work: Decode, touched: dict) -> None:
        seqs = work.seqs
        if self.batch_invariant and len(seqs) > 1:  # each row alone: its speculation and sampling see only itself
            for s in seqs:
                self._run_decode(Decode([s]), touched)
            self.counters["decode_steps"] -= len(seqs) - 1
            return
        positions, tables = [len(s.token_ids) - 1 for s in seqs], [s.block_table for s in seqs]
        self.counters["decode_steps"] += 1
        if self.speculative and all(self._spec_ready(s) for s in seqs):
            self._run_speculative(seqs, positions, tables)
        else:
            with self.routes.recording(wanted(seqs)):
                if self.speculative:
                    logits, hidden = self.runner.decode([[s.token_ids[-1]] for s in seqs], positions, tables, return_hidden=True)
                else:
                    logits = self.runner.decode([[s.token_ids[-1]] for s in seqs], positions, tables)
            keep_routes(seqs, self.routes.take(), list(range(len(seqs))))
            new = self._sample(seqs, logits[:, 0])
            if self.speculative:  # keep the MTP cache in step; its logits draft the token after `new`
                mtp = self.runner.mtp_decode(hidden, [[t] for t in new], positions, tables)
            for s, tok in zip(seqs, new):
                s.num_computed += 1
                self._append(s, tok)
            if self.speculative:
                self._draft(seqs, mtp[:, 0])
            self.counters["decode_tokens"] += len(seqs)
        for s in seqs:
            touched[s.request_id] = self._requests[s.request_id]

    def _append(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        grammar_done = False
        if seq.guide is not None and seq.error is None:
            try:
                grammar_done = guided.advance(seq.guide, tok)
            except guided.GuidanceError as e:
                seq.error = str(e)
        if seq.error is not None:  # this sequence's grammar failed: it alone ends, without the token
            self._grammars.forget(p.guided_decoding, self._guide_budget(p, seq.num_prompt_tokens))
            return self._finish(seq, "error")
        seq.token_ids.append(tok)
        if seq.routed_experts is not None:
            seq.routed_experts.append(seq.pending_route)
        # (before min_tokens these ids were masked out of the logits, so they cannot appear here)
        is_stop_id = (tok in self.eos_ids and not p.ignore_eos) or tok in (p.stop_token_ids or ())
        if not is_stop_id or p.include_stop_str_in_output:
            self._detokenize(seq, tok)
        if is_stop_id:
            return self._finish(seq, "stop", None if tok in self.eos_ids and not p.ignore_eos else tok)
        if grammar_done:  # the grammar is complete and allows nothing more (not even eos): done
            if seq.detok is not None:
                seq.text += seq.detok.flush()
            return self._finish(seq, "stop")
        if p.stop and seq.num_output >= p.min_tokens:
            for stop in p.stop:
                at = seq.text.find(stop, max(0, len(seq.text) - seq.new_text_len - len(stop) + 1))
                if at >= 0:
                    seq.text = seq.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                    return self._finish(seq, "stop", stop)
        if seq.num_output >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        if reason != "abort":
            self.scheduler.remove(seq)
            if seq.detok is not None and reason == "length":
                seq.text += seq.detok.flush()
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
