"""The DeepSeek-V3.2 chat encoding (no Jinja: DeepSeek ships a Python encoder, `encoding/encoding_dsv32.py`
in the deepseek-ai/DeepSeek-V3.2 repository; this module is written from what it specifies).

Prompt layout (BOS first; every message renders on its own, in order):
  system     content, then "\\n\\n" + the tool block when the conversation has tools (below)
  developer  `<｜User｜>` + ["\\n\\n" + tool block] + "\\n\\n# The user's message is: " + content + the opener
  user       `<｜User｜>` + content + the opener
  opener     `<｜Assistant｜>` + `<think>` for the LAST user/developer message in thinking mode, else `</think>`
  assistant  [reasoning + `</think>`] + content + ["\\n\\n" + DSML calls] + EOS; the reasoning part only
             in thinking mode and only after the last user message (earlier reasoning is dropped)
  tool       the results of one assistant message's calls, one `tool` message per call, in order:
             "\\n\\n<function_results>" + "\\n<result>" + content + "</result>" per call + "\\n</function_results>"
             + "\\n\\n" + (`<think>` in thinking mode after the last user message, else `</think>`)
There is no separate generation prompt: a user turn and a run of tool results already end with the
assistant's opener, so the prompt of a conversation that ends there is ready for the reply.

Tool calls (DSML; `｜DSML｜` is plain text to the tokenizer):
  <｜DSML｜function_calls>
  <｜DSML｜invoke name="NAME">
  <｜DSML｜parameter name="KEY" string="true">a string, as is</｜DSML｜parameter>
  <｜DSML｜parameter name="KEY" string="false">any other JSON value</｜DSML｜parameter>
  </｜DSML｜invoke>
  </｜DSML｜function_calls>
The arguments of a call must be a JSON object; each key is one parameter. Parsing turns parameters back
into an arguments JSON object (`{"KEY": VALUE, ...}`, ", " between items): a `string="true"` value becomes a
JSON string, a `string="false"` value must itself be JSON and is kept as written.

Tools (OpenAI `{"type": "function", "function": {...}}`) are described by `TOOLS_BLOCK` in the first system
message (one is added, empty, when the conversation has none), each function as one JSON line.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from dsv3.data.chat_template import ASSISTANT, USER, content_text, call_parts
from dsv3.data.chat_v31 import END_THINK, THINK
from dsv3.errors import UserError

DSML = "｜DSML｜"
CALLS_OPEN, CALLS_CLOSE = f"<{DSML}function_calls>", f"</{DSML}function_calls>"
INVOKE_OPEN, INVOKE_CLOSE = f"<{DSML}invoke", f"</{DSML}invoke>"
PARAM_OPEN, PARAM_CLOSE = f"<{DSML}parameter", f"</{DSML}parameter>"
CALLS_START = "\n\n" + CALLS_OPEN
"""What separates an answer from its calls block (the block's start marker for the output parser)."""
RESULTS_OPEN, RESULTS_CLOSE = "<function_results>", "</function_results>"

TOOLS_BLOCK = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "{CALLS_OPEN}" block like the following as part of your reply to the user:
{CALLS_OPEN}
{INVOKE_OPEN} name="$FUNCTION_NAME">
{PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAM_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$FUNCTION_NAME2">
...
{INVOKE_CLOSE}
{CALLS_CLOSE}

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

{CALLS_OPEN}
...
{CALLS_CLOSE}

{RESULTS_OPEN}
...
{RESULTS_CLOSE}

{THINK}...thinking about results{END_THINK}

Here are the functions available in JSONSchema format:
<functions>
{{functions}}
</functions>
"""
"""The system-prompt tool description the V3.2 model was trained with (DeepSeek's encoder, verbatim text)."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools: Sequence[dict[str, Any]]) -> str:
    functions = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        functions.append(_json(fn))
    return TOOLS_BLOCK.replace("{functions}", "\n".join(functions))


# ---------------------------------------------------------------------------------------- calls
def encode_call(call: Any, where: str) -> str:
    """One OpenAI tool call -> its DSML invoke."""
    name, args = call_parts(call, where)
    try:
        obj = json.loads(args)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: tool call {name!r} arguments must be a JSON object, got {args[:80]!r}")
    params = [f'{PARAM_OPEN} name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
              f"{v if isinstance(v, str) else _json(v)}{PARAM_CLOSE}" for k, v in obj.items()]
    return f'{INVOKE_OPEN} name="{name}">\n' + "\n".join(params) + f"\n{INVOKE_CLOSE}"


def decode_invoke(head: str, body: str) -> tuple[str, str] | None:
    """The parts of one invoke (`head`: between `<｜DSML｜invoke` and the first `">`, i.e. ` name="NAME`;
    `body`: from there to `</｜DSML｜invoke>`) -> (name, arguments JSON), or None when malformed (a bad
    header, a parameter not typed string="true"/"false", a string="false" value that is not JSON, a key
    given twice). One pass with `str.find`: linear in the invoke's length."""
    name = _attr_value(head, ' name="', "")
    if name is None or not body.startswith("\n"):
        return None
    items: dict[str, str] = {}
    pos = 1
    while pos < len(body):
        if not items and body[pos:] == "\n":  # a call without parameters
            break
        if not body.startswith(PARAM_OPEN, pos):
            return None
        start = pos + len(PARAM_OPEN)
        head_end = body.find('">', start)
        close = body.find(PARAM_CLOSE, head_end + 2) if head_end >= 0 else -1
        if close < 0 or not body.startswith("\n", close + len(PARAM_CLOSE)):
            return None
        value = _typed_value(body[start:head_end + 1], body[head_end + 2:close])
        if value is None or value[0] in items:
            return None
        items[value[0]] = value[1]
        pos = close + len(PARAM_CLOSE) + 1
    return name, "{" + ", ".join(f"{_json(k)}: {v}" for k, v in items.items()) + "}"


def _attr_value(text: str, prefix: str, suffix: str) -> str | None:
    if text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix):
        return text[len(prefix):len(text) - len(suffix)]
    return None


def _typed_value(head: str, raw: str) -> tuple[str, str] | None:
    """` name="KEY" string="true"` (the header up to its closing quote) and the raw value -> (KEY, JSON)."""
    for flag in ("true", "false"):
        key = _attr_value(head, ' name="', f'" string="{flag}"')
        if key is None:
            continue
        if flag == "true":
            return key, _json(raw)
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            return None
        return key, raw
    return None


# ---------------------------------------------------------------------------------------- encoder
def _last_user(messages: Sequence[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _with_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = [dict(m) if isinstance(m, dict) else m for m in messages]
    for i, m in enumerate(out):
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"messages[{i}]: expected an object with a 'role'")
    if tools:
        if not out or out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["tools"] = list(tools)
    return out


def render_chat_v32(messages: Sequence[dict[str, Any]], thinking: bool = False,
                    tools: Sequence[dict[str, Any]] | None = None, bos_token: str = "<｜begin▁of▁sentence｜>",
                    eos_token: str = "<｜end▁of▁sentence｜>") -> str:
    """Render a conversation as the DeepSeek-V3.2 prompt string (module docstring). `tools` (the request's)
    go into the first system message. Messages are OpenAI's, plus `reasoning_content` on assistant turns."""
    msgs = _with_tools(messages, tools)
    last_user = _last_user(msgs)
    out = [bos_token]
    for i, m in enumerate(msgs):
        where, role = f"messages[{i}]", m["role"]
        opener = ASSISTANT + (THINK if thinking and i == last_user else END_THINK)
        text = content_text(m.get("content"), where)
        if role == "system":
            out.append(text + ("\n\n" + tools_block(m["tools"]) if m.get("tools") else ""))
        elif role == "developer":
            if not text:
                raise UserError(f"{where}: a developer message needs content")
            block = "\n\n" + tools_block(m["tools"]) if m.get("tools") else ""
            out += [USER, block, "\n\n# The user's message is: ", text, opener]
        elif role == "user":
            out += [USER, text, opener]
        elif role == "assistant":
            out.append(_assistant(m, text, thinking and i > last_user, where, eos_token))
        elif role == "tool":
            out.append(_tool_result(msgs, i, text, thinking and i > last_user))
        else:
            raise UserError(f"{where}: unknown role {role!r} (expected system, developer, user, assistant or tool)")
    return "".join(out)


def _assistant(m: dict[str, Any], text: str, with_reasoning: bool, where: str, eos_token: str) -> str:
    calls = m.get("tool_calls") or []
    block = ("\n\n" + CALLS_OPEN + "\n" + "\n".join(encode_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
             + "\n" + CALLS_CLOSE) if calls else ""
    reasoning = ""
    if with_reasoning:  # a reply generated in thinking mode keeps its reasoning
        r = m.get("reasoning_content")
        if not (r or calls):
            raise UserError(f"{where}: in thinking mode an assistant message after the last user message needs "
                            f"reasoning_content or tool_calls")
        reasoning = (r if isinstance(r, str) else "") + END_THINK
    return reasoning + text + block + eos_token


def _tool_result(msgs: Sequence[dict[str, Any]], i: int, text: str, thinking_after: bool) -> str:
    j = i - 1
    while j >= 0 and msgs[j]["role"] == "tool":
        j -= 1
    calls = (msgs[j].get("tool_calls") or []) if j >= 0 and msgs[j]["role"] == "assistant" else []
    order = i - j  # 1 for the first result of the run
    if order > len(calls):
        raise UserError(f"messages[{i}]: tool result without a matching call (the assistant message before it "
                        f"made {len(calls)} tool call(s))")
    out = "\n\n" + RESULTS_OPEN if order == 1 else ""
    out += f"\n<result>{text}</result>"
    if order == len(calls):
        out += "\n" + RESULTS_CLOSE + "\n\n" + (THINK if thinking_after else END_THINK)
    return out


# ---------------------------------------------------------------------------------------- completion
def parse_completion_v32(text: str, thinking: bool = False, eos_token: str = "<｜end▁of▁sentence｜>") -> dict[str, Any]:
    """A V3.2 completion (the text generated after a prompt from `render_chat_v32`, EOS optional) ->
    {"role": "assistant", "content", "reasoning_content", "tool_calls"} with OpenAI tool calls. Strict, as
    DeepSeek's parser: a malformed completion is a UserError naming what is wrong."""
    if text.endswith(eos_token):
        text = text[:-len(eos_token)]
    reasoning = ""
    if thinking:
        end = text.find(END_THINK)
        if end < 0:
            raise UserError(f"completion: thinking mode, but no {END_THINK} ends the reasoning")
        reasoning, text = text[:end], text[end + len(END_THINK):]
    start = text.find(CALLS_START)
    content, calls = (text, []) if start < 0 else (text[:start], _parse_calls(text, start + len(CALLS_START)))
    for part, label in ((reasoning, "reasoning"), (content, "content")):
        for marker in (THINK, END_THINK, DSML, eos_token):
            if marker in part:
                raise UserError(f"completion: unexpected {marker!r} in the {label}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


def _parse_calls(text: str, pos: int) -> list[tuple[str, str]]:
    calls = []
    while True:
        if text.startswith("\n" + CALLS_CLOSE, pos):
            if pos + 1 + len(CALLS_CLOSE) != len(text):
                raise UserError(f"completion: text after {CALLS_CLOSE}")
            return calls
        if not text.startswith("\n" + INVOKE_OPEN, pos):
            raise UserError(f"completion: expected {INVOKE_OPEN} or {CALLS_CLOSE} at character {pos}")
        head_at = pos + 1 + len(INVOKE_OPEN)
        head_end = text.find('">', head_at)
        close = text.find(INVOKE_CLOSE, head_end) if head_end >= 0 else -1
        call = decode_invoke(text[head_at:head_end], text[head_end + 2:close]) if close >= 0 else None
        if call is None:
            raise UserError(f"completion: malformed {INVOKE_OPEN} at character {pos + 1} (expected name=\"...\" and "
                            f"parameters typed string=\"true|false\", non-string values as JSON)")
        calls.append(call)
        pos = close + len(INVOKE_CLOSE)
