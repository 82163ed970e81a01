"""`--reasoning-parser deepseek_r1`: split R1-style output into `reasoning_content` and `content`.

DeepSeek-R1 writes `<think>\\n...\\n</think>\\n\\n` and then the answer. Newer chat templates open
`<think>\\n` themselves, so the generated text may start inside the reasoning with no opening tag
(vLLM #12999). vLLM's rule, followed here:
  - a leading `<think>` (if any) is dropped;
  - everything before the first `</think>` is reasoning, everything after it is content;
  - with no `</think>` at all the whole output is reasoning (the model never left its thoughts,
    e.g. it hit `max_tokens`), and content is None.
Empty parts are None. `max_tokens` counts reasoning and content tokens together (they are one
generation).

Streaming works on the cumulative text released so far (`ReasoningStream.feed`): each call parses
the text minus a trailing partial tag (`</thi` may become `</think>` later) and returns what is new
in each part, so the joined deltas equal the non-streamed split exactly, whichever way the text was
cut into deltas.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def _none_if_empty(s: str) -> str | None:
    return s or None


class DeepSeekR1ReasoningParser:
    """Stateless splitter; one `stream()` per streamed choice.

    `opening_required=True` (`constrained()`) is the rule under a grammar constraint (structured
    output): the grammar applies from the first token, so only output that itself opens with
    `<think>` has a reasoning part; anything else is all content (JSON stays `content`)."""

    name = "deepseek_r1"

    def __init__(self, opening_required: bool = False):
        self.opening_required = opening_required

    def constrained(self) -> "DeepSeekR1ReasoningParser":
        return DeepSeekR1ReasoningParser(opening_required=True)

    def split(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content), both strings ("" when absent)."""
        if self.opening_required and not text.startswith(THINK_START):
            return "", text
        if text.startswith(THINK_START):
            text = text[len(THINK_START):]
        reasoning, sep, content = text.partition(THINK_END)
        return reasoning, content if sep else ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """Non-streamed output -> (reasoning_content, content), None where empty."""
        reasoning, content = self.split(text)
        return _none_if_empty(reasoning), _none_if_empty(content)

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self)


class ReasoningStream:
    """Per-choice streaming state: how much reasoning / content has been sent."""

    def __init__(self, parser: DeepSeekR1ReasoningParser):
        self.parser = parser
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        """`text`: the cumulative output so far. -> (reasoning delta, content delta)."""
        if not finished:
            text = text[: len(text) - _partial_tag_len(text)]
        reasoning, content = self.parser.split(text)
        r = reasoning[self.sent_reasoning:]
        c = content[self.sent_content:]
        self.sent_reasoning += len(r)
        self.sent_content += len(c)
        return r, c


def _partial_tag_len(text: str) -> int:
    """Length of a trailing piece of `text` that may still grow into a tag: a proper prefix of
    `</think>` at the end (only while no `</think>` was seen), or of `<think>` when it is all the
    text so far (the opening tag is only special at the start)."""
    if THINK_END in text:
        return 0
    if len(text) < len(THINK_START) and THINK_START.startswith(text):
        return len(text)
    for k in range(min(len(THINK_END) - 1, len(text)), 0, -1):
        if THINK_END.startswith(text[-k:]):
            return k
    return 0


class DeepSeekV3ReasoningParser:
    """`--reasoning-parser deepseek_v3` (vLLM's name; DeepSeek-V3.1 and V3.2 hybrid thinking): per request, the R1
    rule when the request asked for thinking (`chat_template_kwargs: {"thinking": true}`: the prompt
    ends with `<think>`, so the output starts inside the reasoning), else no split (all content)."""

    name = "deepseek_v3"

    def for_request(self, thinking: bool) -> DeepSeekR1ReasoningParser | None:
        return DeepSeekR1ReasoningParser() if thinking else None


PARSERS = {"deepseek_r1": DeepSeekR1ReasoningParser, "deepseek_v3": DeepSeekV3ReasoningParser}


def get_reasoning_parser(name: str | None):
    if name is None:
        return None
    try:
        return PARSERS[name]()
    except KeyError:
        from dsv3.errors import UserError

        raise UserError(f"--reasoning-parser {name!r}: unknown; choose from {', '.join(PARSERS)}") from None


def for_request(parser, thinking: bool) -> DeepSeekR1ReasoningParser | None:
    """The splitter one chat request uses: deepseek_v3's depends on the request's thinking switch."""
    return parser.for_request(thinking) if isinstance(parser, DeepSeekV3ReasoningParser) else parser
