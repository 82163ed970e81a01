"""Tool calling in DeepSeek-V3's format: the tool prompt, `tool_choice`, and the tool-call parser.

The V3 chat template renders tool CALLS and tool RESULTS (`dsv3.data.chat_template`) but has no
place for the tool DEFINITIONS. As vLLM's and SGLang's DeepSeek-V3 tool templates do, we describe
the tools in the system prompt (`tools_system_prompt`, appended after the request's own system
messages) and show the exact call format there; the rest of the prompt is the V3 template
unchanged, so it equals transformers' `apply_chat_template` on the same messages.

The model calls tools with (one token each for the `<｜...｜>` markers)
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]...<｜tool▁calls▁end｜>
`DeepSeekV3ToolParser.extract` turns that back into OpenAI `tool_calls` (text before the calls is
`content`; malformed calls leave the whole text as content, as vLLM does). The streamed form
(`ToolCallStream`) sends the text before `<｜tool▁calls▁begin｜>` as content deltas and each call as
one `delta.tool_calls` entry when its `<｜tool▁call▁end｜>` arrives, so streamed and non-streamed
results are the same structure. V3.1's and V3.2's (DSML) call formats (`CALL_FORMATS`, vLLM's
`--tool-call-parser` names) go through the same scanner.

`tool_choice`:
  "auto" (default with tools)  the model decides; its output is parsed as above;
  "none"                       tools are neither described nor parsed (plain chat);
  "required"                   guided decoding to a JSON array of {"name", "parameters"} objects
                               (one of the tools each; at most one with parallel_tool_calls=false),
                               the vLLM approach; parsed into tool_calls;
  {"type": "function", "function": {"name": N}}  guided decoding to N's parameter schema; the
                               output is the arguments of one call to N.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from dsv3.data.chat_template import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from dsv3.data.chat_v32 import CALLS_CLOSE, CALLS_START, INVOKE_CLOSE, INVOKE_OPEN, decode_invoke


class ToolError(ValueError):
    """A bad `tools` / `tool_choice` field: (message, param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    if index is not None:
        out = {"index": index, **out}
    return out


# ---------------------------------------------------------------------------------- request side
@dataclass
class ToolPlan:
    """What a request's `tools` / `tool_choice` mean for prompt, decoding and parsing."""

    tools: list[dict]
    mode: str  # "off" (no tools or "none"), "auto", "required", "named"
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def describe(self) -> bool:
        return self.mode != "off"

    def guided_json(self) -> dict | None:
        """JSON schema the output must follow (required / named), else None."""
        if self.mode == "named":
            return _parameters(next(t for t in self.tools if t["function"]["name"] == self.name))
        if self.mode == "required":
            items = {"anyOf": [{"type": "object", "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": _parameters(t)}, "required": ["name", "parameters"]} for t in self.tools]}
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
            if not self.parallel:
                schema["maxItems"] = 1
            return schema
        return None


def _parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def plan_tools(tools: list | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan:
    """Check `tools` / `tool_choice` (OpenAI shapes) -> ToolPlan. Raises ToolError."""
    tools = list(tools or [])
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools[{i}].function.name must be a non-empty string", "tools")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ToolError("tools: function names must be unique", "tools")
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolPlan(tools, "off", parallel=parallel)
    if tool_choice in ("auto", "required"):
        if not tools:
            raise ToolError(f"tool_choice {tool_choice!r} needs a non-empty 'tools' list", "tool_choice")
        return ToolPlan(tools, tool_choice, parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ToolError(f"tool_choice names function {name!r}, which is not in 'tools' ({names})", "tool_choice")
        return ToolPlan(tools, "named", name=name, parallel=parallel)
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or "
                    "{'type': 'function', 'function': {'name': ...}}", "tool_choice")


def tools_system_prompt(tools: list[dict]) -> str:
    """The tool definitions and the V3 call format, as a system-prompt block."""
    lines = ["## Tools", "", "You can call these functions. To call one or more, answer with exactly:",
             f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}FUNCTION_NAME\n```json\nARGUMENTS_AS_JSON\n```{CALL_END}"
             f"{CALLS_END}",
             "(several calls are separated by a newline inside the calls block). The arguments must be "
             "valid JSON matching the function's parameters.", ""]
    for t in tools:
        fn = t["function"]
        lines += [f"### {fn['name']}"]
        if fn.get("description"):
            lines += [f"Description: {fn['description']}"]
        lines += [f"Parameters: {json.dumps(_parameters(t), ensure_ascii=False)}", ""]
    return "\n".join(lines).rstrip("\n")


def with_tool_prompt(messages: list[dict], plan: ToolPlan) -> list[dict]:
    """Messages to render: the request's, plus the tool block as the last system message."""
    if not plan.describe:
        return messages
    return list(messages) + [{"role": "system", "content": tools_system_prompt(plan.tools)}]


# ---------------------------------------------------------------------------------- output side
@dataclass(frozen=True)
class CallFormat:
    """How one call inside `<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>` is written: its markers in
    order, and after which marker (its index) the text since the previous marker is the name / the
    arguments."""

    markers: tuple[str, ...]
    name_at: int
    args_at: int
    begin: str = CALLS_BEGIN
    end: str = CALLS_END
    decode: Callable[[str, str], tuple[str, str] | None] | None = None
    """(name part, arguments part) -> (name, arguments JSON), None when the call is malformed; None: as is."""


V3_CALL = CallFormat((CALL_BEGIN, SEP, "\n```json\n", "\n```" + CALL_END), name_at=2, args_at=3)
"""V3: CALL_BEGIN TYPE SEP NAME \n```json\n ARGS \n``` CALL_END."""
V31_CALL = CallFormat((CALL_BEGIN, SEP, CALL_END), name_at=1, args_at=2)
"""V3.1: CALL_BEGIN NAME SEP ARGS CALL_END (no type, no fence)."""
V32_CALL = CallFormat((INVOKE_OPEN, '">', INVOKE_CLOSE), name_at=1, args_at=2, begin=CALLS_START, end=CALLS_CLOSE,
                      decode=decode_invoke)
"""V3.2 (DSML): "\n\n<｜DSML｜function_calls>", then per call `<｜DSML｜invoke name="NAME">` + typed parameters +
`</｜DSML｜invoke>` (`dsv3.data.chat_v32`); the parameters become the arguments JSON."""
CALL_FORMATS = {"deepseek_v3": V3_CALL, "deepseek_v31": V31_CALL, "deepseek_v32": V32_CALL}
"""`--tool-call-parser` names (vLLM's) -> call format."""


class _CallScanner:
    """Complete calls in a growing calls block, found with `str.find` from a cursor that only moves
    forward: each character is looked at a bounded number of times however the text arrives (a
    regular expression with lazy groups backtracks: 200 repeated markers took ~100 s).

    A call is its format's markers in order (V3: CALL_BEGIN TYPE SEP NAME JSON_OPEN ARGS ARGS_CLOSE),
    each part ending at the first marker after it, as the lazy regex matched: a later start could only
    find later markers, so while one marker is missing no call can complete, and the search resumes
    where it stopped."""

    def __init__(self, start: int, fmt: CallFormat = V3_CALL) -> None:
        self.fmt = fmt
        self.stage = 0  # index in _MARKERS of the marker looked for next
        self.pos = start  # where to look for it
        self.part = start  # where the current part (type, name, args) starts
        self.name = ""
        self.calls: list[tuple[str, str]] = []  # (name, arguments) of every complete call
        self.call_start = start  # where the call being read starts
        self.failed_at: int | None = None  # start of the first malformed call (`fmt.decode`): no call after it

    def scan(self, text: str, end: int) -> None:
        """Find the calls completed in `text[:end]` (the block so far; `text` only grows)."""
        markers = self.fmt.markers
        while self.failed_at is None:
            marker = markers[self.stage]
            i = text.find(marker, self.pos, end)
            if i < 0:  # a partial marker may end the block: look again from where it could start
                self.pos = max(self.pos, end - len(marker) + 1)
                return
            if self.stage == 0:
                self.call_start = i
            if self.stage == self.fmt.name_at:
                self.name = text[self.part:i]
            elif self.stage == self.fmt.args_at:
                call = (self.name, text[self.part:i])
                call = self.fmt.decode(*call) if self.fmt.decode is not None else call
                if call is None:
                    self.failed_at = self.call_start
                    return
                self.calls.append(call)
            self.pos = self.part = i + len(marker)
            self.stage = (self.stage + 1) % len(markers)


class DeepSeekV3ToolParser:
    """V3 (or, with `fmt=V31_CALL`, V3.1) tool-call tokens in generated text -> OpenAI tool calls."""

    def __init__(self, fmt: CallFormat = V3_CALL):
        self.fmt = fmt

    def extract(self, text: str, parallel: bool = True) -> tuple[str | None, list[dict]]:
        """-> (content or None, tool calls). No well-formed call: (text, []). A malformed call after
        well-formed ones ends the calls: the text from it on is content (after the text before the block)."""
        i = text.find(self.fmt.begin)
        if i < 0:
            return text or None, []
        start = i + len(self.fmt.begin)
        end = text.find(self.fmt.end, start)
        scanner = _CallScanner(start, self.fmt)
        scanner.scan(text, len(text) if end < 0 else end)
        if not scanner.calls:
            return text or None, []
        # (parallel_tool_calls=false reads only the first call, as the stream does)
        content = text[:i] + (text[scanner.failed_at:] if scanner.failed_at is not None and parallel else "")
        return content or None, [tool_call(name, args) for name, args in scanner.calls[: None if parallel else 1]]

    def stream(self, parallel: bool = True) -> "ToolCallStream":
        return ToolCallStream(parallel, self.fmt)


class ToolCallStream:
    """Per-choice streaming: content until the calls block, then one delta per completed call.
    If the block ends (or the output finishes) with no well-formed call, the held text is sent as
    content, matching `extract`. Incremental: each `feed` searches only text it has not searched
    before (the block's start and end markers and each call's markers are found from cursors)."""

    def __init__(self, parallel: bool = True, fmt: CallFormat = V3_CALL):
        self.parallel, self.fmt = parallel, fmt
        self.sent_content = 0
        self.sent_calls = 0
        self._begin_pos = 0  # where to look for the block's start marker (fmt.begin) next
        self._head = -1  # where the block starts (set with the scanner)
        self._end_pos = 0  # where to look for its end marker (fmt.end) next
        self._block_end = -1  # where the end marker is, -1 before it is seen
        self._scanner: _CallScanner | None = None

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        """`text`: cumulative content so far (it only grows). -> (content delta, new tool-call deltas)."""
        begin, block_end = self.fmt.begin, self.fmt.end
        if self._scanner is None:
            i = text.find(begin, self._begin_pos)
            if i < 0:
                self._begin_pos = max(self._begin_pos, len(text) - len(begin) + 1)
                keep = len(text) if finished else len(text) - _partial_len(text, begin)
                return self._content(text, keep), []
            self._head, self._end_pos = i, i + len(begin)
            self._scanner = _CallScanner(self._end_pos, self.fmt)
        content = self._content(text, self._head)
        if self._block_end < 0:
            j = text.find(block_end, self._end_pos)
            if j >= 0:
                self._block_end = j
            else:
                self._end_pos = max(self._end_pos, len(text) - len(block_end) + 1)
        calls = self._scanner.calls
        if self.parallel or not calls:  # parallel_tool_calls=false needs only the first call
            end = self._block_end if self._block_end >= 0 else len(text) - _partial_len(text, block_end)
            self._scanner.scan(text, end)
        limit = len(calls) if self.parallel else min(len(calls), 1)
        new = [tool_call(name, args, index=i)
               for i, (name, args) in enumerate(calls[self.sent_calls:limit], start=self.sent_calls)]
        self.sent_calls = max(self.sent_calls, limit)
        if finished and not calls:  # malformed: everything is content, as in extract()
            content += self._content(text, len(text))
        elif finished and self._scanner.failed_at is not None:  # the malformed rest, as in extract()
            content += text[self._scanner.failed_at:]
        return content, new

    def _content(self, text: str, end: int) -> str:
        piece = text[self.sent_content:end]
        self.sent_content = max(self.sent_content, end)
        return piece


def _partial_len(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def calls_from_json(text: str, plan: ToolPlan) -> list[dict] | None:
    """Guided output of tool_choice required / named -> tool calls (None if it does not parse).
    "required": an array cut short (max_tokens: a weak model repeats calls until then) gives its
    complete calls, as a client would otherwise get none of them."""
    try:
        obj = json.loads(text)
    except ValueError:
        if plan.mode == "named":
            return None
        obj = _complete_items(text)
    if plan.mode == "named":  # the arguments exactly as generated (streamed piece by piece)
        return [tool_call(plan.name, text)]
    if not isinstance(obj, list):
        return None
    calls = [tool_call(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
             for c in obj if isinstance(c, dict) and isinstance(c.get("name"), str)]
    return calls[: None if plan.parallel else 1] if calls else None


def _complete_items(text: str) -> list | None:
    """The complete items at the start of a JSON array whose text was cut off (None: not an array)."""
    decoder, items = json.JSONDecoder(), []
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        return None
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            item, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            return items
        items.append(item)
