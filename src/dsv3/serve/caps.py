"""The size caps of `ServerLimits` applied to a parsed request, before anything is compiled,
tokenised or queued: stop lists, the n x prompts fan-out, tools, and structured-output constraints
(schema size, depth and node count, the regexes in it, guided_regex, guided_choice).

Every refusal is a 400 naming the field, the size found and the cap with its `dsv3 serve` flag.
A schema sent as a JSON string is parsed here under the same depth limit as the request body (a
deep one raised RecursionError -> 500), and every regex (guided_regex, a schema's `pattern` /
`patternProperties`) may nest groups at most `max_json_depth` deep (jsonschema compiles them
with Python's recursive `re` parser: 5000 nested groups raised RecursionError).
"""

from __future__ import annotations

import json
from typing import Any

from dsv3.serve.limits import ServerLimits
from dsv3.serve.protocol import APIError


def _over(param: str, what: str, found: int, cap: int, flag: str) -> APIError:
    return APIError(f"{param}: {found} {what}; this server accepts at most {cap} (dsv3 serve {flag})", param=param)


def check_fanout(n: int, prompts: int, limits: ServerLimits) -> None:
    """n samples x prompts engine requests from one call."""
    if n * prompts > limits.max_requests:
        raise APIError(f"n x prompts: {n} x {prompts} = {n * prompts} engine requests in one call; this server "
                       f"accepts at most {limits.max_requests} (dsv3 serve --max-requests)", param="n")


def check_request(req, limits: ServerLimits) -> None:
    """Stop lists, tools and the structured-output fields of a completions / chat request."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise _over("stop", "stop strings", len(stop), limits.max_stop, "--max-stop")
    chars = sum(len(s) for s in stop if isinstance(s, str))
    if chars > limits.max_stop_chars:
        raise _over("stop", "characters of stop strings", chars, limits.max_stop_chars, "--max-stop-chars")
    if req.stop_token_ids is not None and len(req.stop_token_ids) > limits.max_stop:
        raise _over("stop_token_ids", "token ids", len(req.stop_token_ids), limits.max_stop, "--max-stop")
    tools = getattr(req, "tools", None) or []
    if len(tools) > limits.max_tools:
        raise _over("tools", "functions", len(tools), limits.max_tools, "--max-tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("parameters"), dict):
            check_schema(fn["parameters"], f"tools[{i}].function.parameters", limits)
    if req.guided_json is not None:
        check_schema(req.guided_json, "guided_json", limits)
    rf = req.response_format
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict) and "schema" in rf["json_schema"]:
        check_schema(rf["json_schema"]["schema"], "response_format.json_schema.schema", limits)
    if req.guided_regex is not None:
        check_regex(req.guided_regex, "guided_regex", limits)
    if req.guided_choice is not None:
        choices = req.guided_choice
        if len(choices) > limits.max_guided_choices:
            raise _over("guided_choice", "items", len(choices), limits.max_guided_choices, "--max-guided-choices")
        size = sum(len(c.encode("utf-8", "replace")) for c in choices)
        if size > limits.max_guided_bytes:
            raise _over("guided_choice", "bytes of choices", size, limits.max_guided_bytes, "--max-guided-bytes")


def check_schema(schema: Any, param: str, limits: ServerLimits) -> None:
    """A JSON schema (object, or its JSON text): bytes, depth, number of values, and its regexes."""
    if isinstance(schema, str):
        size = len(schema.encode("utf-8", "replace"))
        if size > limits.max_guided_bytes:
            raise _over(param, "bytes", size, limits.max_guided_bytes, "--max-guided-bytes")
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise APIError(f"{param}: the schema nests JSON deeper than {limits.max_json_depth} levels",
                           param=param) from None
        except ValueError:
            return  # not JSON: `structured.guided_spec` answers with the parser's message
    nodes, size = 0, 0
    stack: list[tuple[Any, int, str | None]] = [(schema, 1, None)]
    while stack:
        x, depth, key = stack.pop()
        nodes += 1
        if nodes > limits.max_schema_nodes:
            raise _over(param, "JSON values in the schema (or more)", nodes, limits.max_schema_nodes,
                        "--max-schema-nodes")
        if isinstance(x, str):
            size += len(x) + 2
            if key == "pattern":
                check_regex(x, param, limits, "a regex in the schema")
        elif isinstance(x, (dict, list)):
            if depth > limits.max_json_depth:
                raise APIError(f"{param}: the schema nests JSON deeper than {limits.max_json_depth} levels",
                               param=param)
            size += 2
            items = x.items() if isinstance(x, dict) else ((None, v) for v in x)
            for k, v in items:
                if k is not None:
                    size += len(str(k)) + 3
                    if key == "patternProperties":
                        check_regex(str(k), param, limits, "a regex in the schema")
                stack.append((v, depth + 1, k))
        else:
            size += 8
        if size > limits.max_guided_bytes:
            raise _over(param, "bytes in the schema (or more)", size, limits.max_guided_bytes, "--max-guided-bytes")


def check_regex(pattern: str, param: str, limits: ServerLimits, what: str = "the regex") -> None:
    """Length and group nesting of a regular expression (escapes and character classes skipped)."""
    size = len(pattern.encode("utf-8", "replace"))
    if size > limits.max_guided_bytes:
        raise _over(param, f"bytes in {what}", size, limits.max_guided_bytes, "--max-guided-bytes")
    depth = deepest = 0
    escaped = in_class = False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    if deepest > limits.max_json_depth:
        raise APIError(f"{param}: {what} nests groups {deepest} deep; this server accepts at most "
                       f"{limits.max_json_depth}", param=param)
