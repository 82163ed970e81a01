"""Sampling parameters (vLLM names) and a batched sampler that never waits on the device.

Order of operations on the logits of a batch (one row per sequence), as in vLLM:
    raw logits --(logprobs are taken here)--> min_tokens mask -> repetition / presence / frequency
    penalties -> temperature -> top-k -> top-p -> min-p -> sample
Sampling is the exponential race of the official DeepSeek `generate.py`: argmax(p / E) with
E ~ Exp(1) i.i.d. is an exact draw from p. Each seeded request owns a `torch.Generator`, so its
tokens do not depend on which other requests share the batch. Everything stays on the device; the
engine reads the sampled ids back once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

_EPS_T = 1e-5  # temperatures below this are greedy
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _short(v) -> str:
    """repr of a bad value, cut so an error message stays one short line."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


@dataclass
class GuidedDecodingParams:
    """Structured output (vLLM's names): exactly one of a JSON schema, any JSON object, a regex or a
    choice of strings. Enforced during decoding by `dsv3.infer.guided` (llguidance)."""

    json: dict | str | None = None
    """A JSON schema (a dict or its JSON text): the output is JSON that validates against it."""
    regex: str | None = None
    """The output matches this regular expression (whole output)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    json_object: bool = False
    """The output is one JSON object (OpenAI's response_format json_object)."""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (field names and defaults follow vLLM)."""

    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 = off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (logit / p if positive, * p if negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of tokens already generated, in [-2, 2]."""
    seed: Optional[int] = None
    """Per-request random seed (reproducible whatever else is batched)."""
    stop: Optional[list[str]] = None
    """Stop strings; the text is cut before them."""
    stop_token_ids: Optional[list[int]] = None
    """Token ids that end generation (in addition to eos)."""
    max_tokens: int = 16
    """Most new tokens per completion."""
    min_tokens: int = 0
    """Fewest new tokens before eos / stop ids may end the completion."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks use this for fixed output lengths)."""
    logprobs: Optional[int] = None
    """Return this many top logprobs per generated token (plus the chosen token); 0 = chosen only."""
    prompt_logprobs: Optional[int] = None
    """Return this many top logprobs per prompt token (echo)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    guided_decoding: Optional[GuidedDecodingParams] = None
    """Constrain the output to a grammar (JSON schema / json_object / regex / choice)."""
    return_routed_experts: bool = False
    """Return, per generated token, the expert ids each MoE layer routed it through (`dsv3.infer.routing`)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def validate(self, vocab_size: int | None = None, max_logprobs: int | None = None) -> None:
        """Raise ValueError naming the field, its value and what is expected.

        Every field is checked against what the engine can hold (integers within int64, finite
        floats, top_k / logprobs / token ids within the vocabulary), so a request that passes can
        never make `engine.step()` fail. `max_logprobs` (the server's `--max-logprobs`) caps
        `logprobs` and `prompt_logprobs` below the vocabulary size."""
        def bad(name: str, want: str) -> None:
            raise ValueError(f"{name} must be {want}, got {_short(getattr(self, name))}")

        def is_int(v, lo: int = _INT64_MIN, hi: int = _INT64_MAX) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        vocab = vocab_size if vocab_size is not None else _INT64_MAX
        if not is_int(self.n, 1):
            bad("n", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not is_int(self.top_k, -1, vocab):
            bad("top_k", f"-1 or 0 (off), or an integer in [1, vocab size {vocab}]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not is_num(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "a finite number > 0")
        if not is_num(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "in [-2, 2]")
        if not is_num(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "in [-2, 2]")
        if not is_int(self.max_tokens, 1):
            bad("max_tokens", "an integer >= 1")
        if not is_int(self.min_tokens, 0, self.max_tokens):
            bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        top = min(vocab, max_logprobs) if max_logprobs is not None else vocab
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not is_int(v, 0, top):
                bad(name, f"None or an integer in [0, {top}]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "None or an integer in the int64 range [-2**63, 2**63 - 1]")
        if self.stop is not None and (not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "None or a list of non-empty strings")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list) or not all(is_int(t, 0, vocab - 1) for t in self.stop_token_ids)
        ):
            bad("stop_token_ids", "None or a list of valid token ids")
        if not isinstance(self.return_routed_experts, bool):
            bad("return_routed_experts", "true or false")
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, GuidedDecodingParams):
                bad("guided_decoding", "None or a GuidedDecodingParams")
            from dsv3.infer import guided

            guided.validate(self.guided_decoding)  # ValueError naming the bad schema / regex

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS_T or self.top_k == 1


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, as device tensors (built once per step)."""

    temperature: torch.Tensor  # [B] fp32 (1.0 for greedy rows: they take the argmax anyway)
    greedy: torch.Tensor  # [B] bool
    top_k: Optional[torch.Tensor] = None  # [B] int64, V = off; None when no row uses it
    top_p: Optional[torch.Tensor] = None  # [B] fp32
    min_p: Optional[torch.Tensor] = None  # [B] fp32
    repetition: Optional[torch.Tensor] = None  # [B] fp32
    presence: Optional[torch.Tensor] = None  # [B] fp32
    frequency: Optional[torch.Tensor] = None  # [B] fp32
    generators: list[Optional[torch.Generator]] = field(default_factory=list)
    all_greedy: bool = False


def make_batch(params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]], vocab_size: int,
               device: torch.device) -> SamplingBatch:
    """Collect per-row settings into tensors; optional transforms stay None when no row uses them."""
    def col(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    greedy = [p.greedy for p in params]
    b = SamplingBatch(
        temperature=col([1.0 if g else max(p.temperature, _EPS_T) for p, g in zip(params, greedy)]),
        greedy=col(greedy, torch.bool),
        generators=list(generators),
        all_greedy=all(greedy),
    )
    if b.all_greedy:
        return b
    if any(p.top_k > 0 for p in params):
        b.top_k = col([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64)
    if any(p.top_p < 1 for p in params):
        b.top_p = col([p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        b.min_p = col([p.min_p for p in params])
    return b


def add_penalties(b: SamplingBatch, params: Sequence[SamplingParams], device: torch.device) -> bool:
    """Fill the penalty columns; returns whether any row has a penalty (callers then build counts)."""
    if not any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        return False
    b.repetition = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32).to(device)
    b.presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32).to(device)
    b.frequency = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32).to(device)
    return True


def token_counts(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float counts of each token id in each row (padding goes to a dropped extra column)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(width, 1)), vocab_size, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    ids = ids.to(device)
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch, prompt_counts: torch.Tensor, output_counts: torch.Tensor) -> torch.Tensor:
    """logits [B,V] fp32. Repetition (HF/vLLM: prompt and output tokens), then OpenAI presence/frequency
    (output tokens only)."""
    seen = (prompt_counts + output_counts) > 0
    rep = b.repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - b.frequency[:, None] * output_counts - b.presence[:, None] * (output_counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p as -inf masks. logits [B,V] fp32 -> [B,V] fp32."""
    logits = logits / b.temperature[:, None]
    if b.top_k is not None or b.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if b.top_k is not None:
            rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            drop |= rank >= b.top_k[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if b.top_p is not None:
            probs = sorted_logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
            drop |= before >= b.top_p[:, None]  # the most likely token always stays (before = 0)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if b.min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < b.min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def race(weights: torch.Tensor, generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One draw per row from weights [B,V] >= 0 (normalised or not): argmax(w / E), E ~ Exp(1), picks i
    with probability w_i / sum(w). Rows with a generator use it (reproducible per request)."""
    noise = torch.empty_like(weights)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    return (weights / noise).argmax(-1)


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits [B,V] fp32 (already penalised) -> token ids [B] int64 on the device, no host sync."""
    greedy_ids = logits.argmax(-1)
    if b.all_greedy:
        return greedy_ids
    sampled = race(filter_logits(logits, b).softmax(-1), b.generators)
    return torch.where(b.greedy, greedy_ids, sampled)


def distribution(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """The distribution `sample` draws each row from, as probabilities [B,V]: one-hot at the argmax for
    greedy rows, softmax of the filtered logits for sampled rows (`race` on it == `sample`)."""
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if b.all_greedy:
        return one_hot
    return torch.where(b.greedy[:, None], one_hot, filter_logits(logits, b).softmax(-1))


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                     generators: Sequence[Optional[torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). The draft x was drawn from q; keep
    it with probability min(1, p(x) / q(x)), else draw from normalise(max(0, p - q)). The token is then
    distributed exactly as p. p, q [B,V] probabilities, draft [B] -> (accepted [B] bool, token [B])."""
    px = p.gather(1, draft[:, None])[:, 0]
    qx = q.gather(1, draft[:, None])[:, 0]
    u = torch.empty_like(px)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        u.uniform_()
    for i in seeded:
        u[i : i + 1].uniform_(generator=generators[i])
    accepted = u * qx < px  # u < p(x)/q(x) without dividing (q(x) > 0: x was drawn from q)
    residual = (p - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected anyway
    return accepted, torch.where(accepted, draft, race(residual, generators))


def topn_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs [B,V]; chosen [B] -> (chosen logprob [B], chosen rank [B], top ids [B,n], top logprobs [B,n])."""
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0]
    rank = (logprobs > chosen_lp[:, None]).sum(-1) + 1
    top_lp, top_ids = logprobs.topk(n, dim=-1) if n > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, rank, top_ids, top_lp
