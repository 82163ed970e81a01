"""A chat choice's generated text -> the OpenAI message: reasoning, content, tool calls.

Two stages, in this order, on the text the engine generated:
  1. `--reasoning-parser`: `<think>...</think>` -> `reasoning_content` (`dsv3.serve.reasoning`);
  2. the tool plan (`dsv3.serve.tools`): "auto" parses V3 tool-call tokens out of the content,
     "required" parses the guided JSON array, a named function makes the guided JSON its arguments.
`ChatChoiceParser.full` does it on the final text; `ChatChoiceParser.delta` on the cumulative text
released so far, returning the new delta fields, so the joined stream equals the full result.
"""

from __future__ import annotations

from typing import Any

from dsv3.serve.tools import V3_CALL, CallFormat, DeepSeekV3ToolParser, ToolPlan, calls_from_json, tool_call


class ChatChoiceParser:
    def __init__(self, reasoning_parser, plan: ToolPlan, call_format: CallFormat = V3_CALL):
        self.reasoning = reasoning_parser
        self.plan = plan
        self.tools = DeepSeekV3ToolParser(call_format)
        # streaming state
        self._rstream = reasoning_parser.stream() if reasoning_parser is not None else None
        self._tstream = self.tools.stream(plan.parallel) if plan.mode == "auto" else None
        self._content = ""  # cumulative content after the reasoning split
        self._sent_args = 0  # named: argument characters sent
        self._called = False

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """vLLM: "tool_calls" once the model called a tool (auto / required)."""
        if engine_reason is not None and self._called and self.plan.mode in ("auto", "required"):
            return "tool_calls"
        return engine_reason

    # ------------------------------------------------------------------ whole output
    def full(self, text: str) -> dict[str, Any]:
        """-> fields of the response message: content, reasoning_content, tool_calls."""
        reasoning, content = self.reasoning.extract(text) if self.reasoning is not None else (None, text)
        calls: list[dict] = []
        mode = self.plan.mode
        if mode == "auto":
            content, calls = self.tools.extract(content or "", self.plan.parallel)
        elif mode == "named":  # the output IS the arguments (even if cut short by max_tokens, as OpenAI)
            content, calls = None, [tool_call(self.plan.name, content or "")]
        elif mode == "required":
            parsed = calls_from_json(content or "", self.plan)
            if parsed is not None:
                content, calls = None, parsed
        self._called = bool(calls)
        if self.reasoning is not None or mode != "off":
            content = content or None
        return {"content": content, "reasoning_content": reasoning, "tool_calls": calls}

    # ------------------------------------------------------------------ streamed
    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        """`text`: the cumulative released text. -> the delta's new fields ({} when nothing is new)."""
        out: dict[str, Any] = {}
        if self._rstream is not None:
            dr, dc = self._rstream.feed(text, finished)
            if dr:
                out["reasoning_content"] = dr
            self._content += dc
        else:
            self._content = text
        mode = self.plan.mode
        if mode == "auto":
            dc, calls = self._tstream.feed(self._content, finished)
            if dc:
                out["content"] = dc
            if calls:
                out["tool_calls"] = calls
                self._called = True
        elif mode == "named":
            piece = self._content[self._sent_args:]
            if piece or (finished and not self._called):
                call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
                if not self._called:
                    call = tool_call(self.plan.name, piece, index=0)
                    self._called = True
                out["tool_calls"] = [call]
                self._sent_args = len(self._content)
        elif mode == "required":
            if finished:  # the array is only known once the JSON is complete
                calls = calls_from_json(self._content, self.plan)
                if calls is not None:
                    out["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                    self._called = True
                elif self._content:
                    out["content"] = self._content
        else:
            new = self._content[self._sent_args:]
            if new:
                out["content"] = new
                self._sent_args = len(self._content)
        return out
