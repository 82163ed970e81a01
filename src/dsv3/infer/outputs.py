"""What the engine returns: vLLM-shaped `RequestOutput` / `CompletionOutput` / `Logprob`.

Outputs are cumulative (the whole text and token list so far), like vLLM's offline API; a streaming
server computes deltas from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class Logprob:
    """Log-probability of one token under the model (raw logits, before sampling transforms)."""

    logprob: float
    """Natural-log probability."""
    rank: int
    """1 = the most likely token."""
    decoded_token: Optional[str] = None
    """The token's text (None without a tokenizer)."""


# Per generated (or prompt) token: {token_id: Logprob} holding the top-n and the chosen token.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request."""

    index: int
    """Position among the request's n completions."""
    text: str
    """Generated text so far (stop strings excluded unless include_stop_str_in_output)."""
    token_ids: list[int]
    """Generated token ids so far (a stop token id, eos included, is the last one)."""
    logprobs: Optional[SampleLogprobs] = None
    """Per generated token, top-n logprobs plus the chosen token; None when not requested."""
    finish_reason: Optional[FinishReason] = None
    """'stop' (eos / stop id / stop string), 'length' (max_tokens or context), 'abort', 'error' (this
    completion alone failed: its grammar hit a limit; see `error`), or None while running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it (None for eos, length, running)."""
    cumulative_logprob: Optional[float] = None
    """Sum of the chosen tokens' logprobs (only when logprobs were requested)."""
    error: Optional[str] = None
    """Why a completion finished with 'error' (one line about this request only)."""
    routed_experts: Optional[list[list[list[int]]]] = None
    """Per generated token, per MoE layer of the main model, the K expert ids its sampling position was
    routed to (router order) [n_tokens][L][K]; None when `return_routed_experts` was not asked
    (`dsv3.infer.routing`)."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Per-request counters (summed over the request's n completions)."""

    spec_num_draft_tokens: int = 0
    """MTP draft tokens verified by speculative decoding."""
    spec_num_accepted_tokens: int = 0
    """Of those, drafts accepted."""


@dataclass
class RequestOutput:
    """The state of one request after an engine step."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs] = None
    """Per prompt token (None for the first), when `prompt_logprobs` was requested."""
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    """True once every completion has finished."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (their latents were not recomputed)."""
    metrics: Optional[RequestMetrics] = None
    """Speculative-decoding counters of this request."""
    weight_version: Optional[str] = None
    """The engine's weight version when this output was produced (`LLMEngine.update_weights`)."""
