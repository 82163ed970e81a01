"""The DeepSeek-V3.1 chat format (hybrid thinking), written out in Python (no Jinja).

V3.1 (and V3.1-Terminus) keep V3's special tokens but change the prompt, as DeepSeek's model card and
the `tokenizer_config.json` template describe:

* every assistant turn opens with `<｜Assistant｜>` followed by `</think>` (non-thinking) or, for the
  turn being generated in thinking mode, `<think>`; earlier turns are always rendered in the
  non-thinking form, with anything up to a `</think>` in their content dropped;
* the `thinking` switch (`chat_template_kwargs={"thinking": true}` in vLLM's API) only changes the
  generation prompt: `<｜Assistant｜><think>` instead of `<｜Assistant｜></think>`;
* tools (non-thinking mode) are described in the system prompt (`tool_description`) and called as
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
  (no type, no ```json fence, no newline between calls, unlike V3);
* tool results are `<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>`, and the assistant continues right
  after them (no `<｜Assistant｜>` tag, no `<｜tool▁outputs▁begin/end｜>` wrapper).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from dsv3.data.chat_template import (ASSISTANT, CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, OUTPUT_BEGIN, OUTPUT_END,
                                     SEP, USER, call_parts, content_text, system_prompt)
from dsv3.errors import UserError

THINK, END_THINK = "<think>", "</think>"

TOOLS_HEADER = "## Tools\nYou have access to the following tools:\n"
TOOLS_FOOTER = ("\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
                f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}{{{{additional_tool_calls}}}}{CALLS_END}\n\n"
                "Where:\n\n"
                "- `tool_call_name` must be an exact match to one of the available tools\n"
                "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
                "- For multiple tool calls, chain them directly without separators or spaces\n")


def tool_description(tools: Sequence[dict[str, Any]]) -> str:
    """The system-prompt block that lists `tools` (OpenAI `{"type": "function", "function": {...}}`)."""
    parts = [TOOLS_HEADER]
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        params = json.dumps(fn.get("parameters", {}), ensure_ascii=False)
        parts.append(f"\n### {fn['name']}\nDescription: {fn.get('description') or ''}\n\nParameters: {params}\n")
    parts.append(TOOLS_FOOTER)
    return "".join(parts)


def _call(call: Any, where: str) -> str:
    name, args = call_parts(call, where)
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


def render_chat_v31(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, thinking: bool = False,
                    tools: Sequence[dict[str, Any]] | None = None, bos_token: str = "<｜begin▁of▁sentence｜>",
                    eos_token: str = "<｜end▁of▁sentence｜>") -> str:
    """Render a conversation as the DeepSeek-V3.1 prompt string (module docstring)."""
    sys_prompt = system_prompt(messages)
    if tools:
        sys_prompt += "\n\n" + tool_description(tools)
    out = [bos_token, sys_prompt]
    last_user = False  # the previous message was the user's: an assistant turn opens with its tag
    for i, m in enumerate(messages):
        role, where = m["role"], f"messages[{i}]"
        if role == "system":
            continue
        if role == "user":
            out += [USER, content_text(m.get("content"), where)]
            last_user = True
        elif role == "assistant":
            text = content_text(m.get("content"), where)
            if last_user:
                out += [ASSISTANT, END_THINK]
            if END_THINK in text:  # earlier turns keep only their answer
                text = text.split(END_THINK, 1)[1]
            calls = m.get("tool_calls")
            if calls:
                out += [text, CALLS_BEGIN, *(_call(c, where) for c in calls), CALLS_END, eos_token]
            else:
                out += [text, eos_token]
            last_user = False
        elif role == "tool":
            out += [OUTPUT_BEGIN, content_text(m.get("content"), where), OUTPUT_END]
            last_user = False
        else:
            raise UserError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
    if add_generation_prompt and last_user:
        out += [ASSISTANT, THINK if thinking else END_THINK]
    return "".join(out)


def is_v31_template(template: str | None) -> bool:
    """Whether a checkpoint's Jinja chat template is V3.1's hybrid-thinking one (it reads a `thinking`
    variable and opens assistant turns with `</think>`)."""
    return bool(template) and "thinking" in template and END_THINK in template and "tool▁sep" in template
