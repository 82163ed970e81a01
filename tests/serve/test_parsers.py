"""The reasoning and tool-call parsers on their own: non-streamed split, and streamed deltas (cut at
every possible place) that join to the same result."""

from __future__ import annotations

import json
import lzma

import pytest

from dsv3.data.chat_template import render_chat
from dsv3.serve.reasoning import DeepSeekR1ReasoningParser, get_reasoning_parser
from dsv3.serve.tools import DeepSeekV3ToolParser, ToolError, calls_from_json, plan_tools, with_tool_prompt

CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


def _cuts(text: str):
    """Every way of cutting `text` into 1-3 pieces plus single characters (streaming shapes)."""
    yield [text[i:i + 1] for i in range(len(text))]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for i in range(0, len(text) + 1, 3):
        for j in range(i, len(text) + 1, 5):
            yield [text[:i], text[i:j], text[j:]]


def _stream_reasoning(parser, pieces):
    st, cum, r, c = parser.stream(), "", "", ""
    for k, p in enumerate(pieces):
        cum += p
        dr, dc = st.feed(cum, finished=k == len(pieces) - 1)
        r, c = r + dr, c + dc
    return r or None, c or None


@pytest.mark.parametrize("text, want", [
    ("<think>\nplan it\n</think>\n\nThe answer is 4.", ("\nplan it\n", "\n\nThe answer is 4.")),
    ("plan it</think>answer", ("plan it", "answer")),  # the template opened <think> (vLLM #12999)
    ("<think>still thinking", ("still thinking", None)),  # cut by max_tokens inside the reasoning
    ("no tags at all", ("no tags at all", None)),
    ("<think></think>just content", (None, "just content")),
    ("a</think>b</think>c", ("a", "b</think>c")),
    ("x <thin y", ("x <thin y", None)),
    ("</th", ("</th", None)),
])
def test_reasoning_split_streamed_and_not(text, want):
    parser = get_reasoning_parser("deepseek_r1")
    assert parser.extract(text) == want
    for pieces in _cuts(text):
        assert _stream_reasoning(parser, pieces) == want, pieces


def test_reasoning_constrained_needs_the_opening_tag():
    parser = get_reasoning_parser("deepseek_r1").constrained()
    for text, want in [("<think>a</think>b", ("a", "b")), ("a</think>b", (None, "a</think>b")),
                       ('{"x": 1}', (None, '{"x": 1}')), ("<thin", (None, "<thin"))]:
        assert parser.extract(text) == want
        for pieces in _cuts(text):
            assert _stream_reasoning(parser, pieces) == want, pieces


def test_reasoning_stream_holds_partial_tag():
    st = DeepSeekR1ReasoningParser().stream()
    assert st.feed("abc</thi", False) == ("abc", "")  # "</thi" may become "</think>"
    assert st.feed("abc</think>", False) == ("", "")
    assert st.feed("abc</think>OK", False) == ("", "OK")
    st = DeepSeekR1ReasoningParser().stream()
    assert st.feed("<thi", False) == ("", "")
    assert st.feed("<think>x", False) == ("x", "")


def test_unknown_reasoning_parser():
    from dsv3.errors import UserError

    with pytest.raises(UserError, match="deepseek_r1"):
        get_reasoning_parser("qwen3")


# ------------------------------------------------------------------------------------------ tools
def _stream_tools(pieces, parallel=True):
    st, cum, content, calls = DeepSeekV3ToolParser().stream(parallel), "", "", []
    for k, p in enumerate(pieces):
        cum += p
        dc, new = st.feed(cum, finished=k == len(pieces) - 1)
        content += dc
        calls += new
    return content or None, [(c["function"]["name"], c["function"]["arguments"]) for c in calls], \
        [c["index"] for c in calls]


def _plain(calls):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("text, content, calls", [
    ("Let me check." + BEGIN + CALL.format("get_weather", '{"city": "Paris"}') + "\n"
     + CALL.format("now", "{}") + END, "Let me check.", [("get_weather", '{"city": "Paris"}'), ("now", "{}")]),
    (BEGIN + CALL.format("get_weather", '{"city":\n "Rome"}') + END, None, [("get_weather", '{"city":\n "Rome"}')]),
    ("plain answer", "plain answer", []),
    ("broken " + BEGIN + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>x", "broken " + BEGIN
     + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>x", []),
])
def test_tool_calls_streamed_equal_non_streamed(text, content, calls):
    got_content, got_calls = DeepSeekV3ToolParser().extract(text)
    assert (got_content, _plain(got_calls)) == (content, calls)
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in got_calls)
    for pieces in _cuts(text):
        c, cl, idx = _stream_tools(pieces)
        assert (c, cl) == (content, calls), pieces
        assert idx == list(range(len(calls)))


def test_parallel_tool_calls_false_keeps_first():
    text = BEGIN + CALL.format("now", "{}") + "\n" + CALL.format("get_weather", '{"city": "X"}') + END
    assert _plain(DeepSeekV3ToolParser().extract(text, parallel=False)[1]) == [("now", "{}")]
    assert _stream_tools([text[:40], text[40:]], parallel=False)[1] == [("now", "{}")]


def test_tool_choice_plans():
    assert plan_tools(None, None, None).mode == "off"
    assert plan_tools(TOOLS, None, None).mode == "auto"
    assert plan_tools(TOOLS, "none", None).describe is False
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.mode == "named" and named.guided_json() == TOOLS[0]["function"]["parameters"]
    req = plan_tools(TOOLS, "required", False)
    schema = req.guided_json()
    assert schema["type"] == "array" and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    out = calls_from_json('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]', req)
    assert _plain(out) == [("get_weather", '{"city": "Oslo"}')]
    assert calls_from_json("not json", req) is None
    for tools, choice, param in [(TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
                                 (None, "required", "tool_choice"), (TOOLS, "sometimes", "tool_choice"),
                                 ([{"type": "function", "function": {}}], "auto", "tools"),
                                 ([TOOLS[0], TOOLS[0]], "auto", "tools")]:
        with pytest.raises(ToolError) as e:
            plan_tools(tools, choice, None)
        assert e.value.param == param


# ------------------------------------------------------- the rendered prompt vs transformers' template
@pytest.fixture(scope="module")
def hf_v3_tokenizer(tmp_path_factory, data_dir):
    """transformers' tokenizer built from the shared DeepSeek-V3 tokenizer files (skip when absent)."""
    transformers = pytest.importorskip("transformers")
    src = data_dir / "deepseek_v3_tokenizer"
    if not (src / "tokenizer.json.xz").is_file():
        pytest.skip("needs the shared DeepSeek-V3 tokenizer (DSV3_DATA_DIR or ../shared/data)")
    d = tmp_path_factory.mktemp("hf_v3_tok")
    with lzma.open(src / "tokenizer.json.xz", "rb") as f:
        (d / "tokenizer.json").write_bytes(f.read())
    (d / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    return transformers.AutoTokenizer.from_pretrained(str(d))


def test_tool_turns_render_as_transformers(hf_v3_tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [call]},  # transformers drops content=None keys
         {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "Checking.", "tool_calls": [call, {**call, "id": "c2"}]},
         {"role": "tool", "tool_call_id": "c1", "content": "18C"},
         {"role": "assistant", "content": "It is 18C."}, {"role": "user", "content": "Thanks"}],
    ]
    for msgs in convs:
        for choice in ("auto", "none"):
            plan = plan_tools(TOOLS, choice, None)
            full = with_tool_prompt(msgs, plan)
            ours = render_chat(full, add_generation_prompt=True)
            ref = hf_v3_tokenizer.apply_chat_template(full, tools=TOOLS, tokenize=False, add_generation_prompt=True)
            assert ours == ref
            assert ("## Tools" in ours) == (choice == "auto")
    assert json.dumps(TOOLS[0]["function"]["parameters"]) in render_chat(with_tool_prompt(convs[0], plan_tools(
        TOOLS, "auto", None)))


# ------------------------------------------------- a chat choice: reasoning, then tools, streamed == full
@pytest.mark.parametrize("choice, text", [
    ("auto", "<think>\nNeed weather.\n</think>\n\nOne moment." + BEGIN + CALL.format("get_weather", '{"city": "Oslo"}')
     + END),
    ("auto", "Need weather.</think>" + BEGIN + CALL.format("now", "{}") + END),
    ("auto", "<think>hm</think>No tool needed."),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Lima"}'),
    ("required", '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Bern"}}]'),
    ("required", "[not json"),
    ("none", "<think>a</think>b"),
])
def test_chat_choice_streamed_equals_full(choice, text):
    from dsv3.serve.handlers.chat_output import ChatChoiceParser

    plan = plan_tools(TOOLS, choice, None)
    # guided output has no reasoning part: the chat handler turns the reasoning parser off for it
    reasoning = get_reasoning_parser("deepseek_r1") if plan.guided_json() is None else None
    full_parser = ChatChoiceParser(reasoning, plan)
    full = full_parser.full(text)
    want_finish = full_parser.finish_reason("stop")
    for pieces in list(_cuts(text))[::7]:
        p, cum, got = ChatChoiceParser(reasoning, plan), "", {"content": "", "reasoning_content": "", "tool_calls": []}
        for k, piece in enumerate(pieces):
            cum += piece
            d = p.delta(cum, finished=k == len(pieces) - 1)
            got["content"] += d.get("content", "")
            got["reasoning_content"] += d.get("reasoning_content", "")
            for c in d.get("tool_calls", []):
                if "id" in c:
                    got["tool_calls"].append({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                else:  # a later piece of the same call's arguments
                    got["tool_calls"][c["index"]]["arguments"] += c["function"]["arguments"]
        assert (got["content"] or None) == full["content"], pieces
        assert (got["reasoning_content"] or None) == full["reasoning_content"], pieces
        assert got["tool_calls"] == [c["function"] for c in full["tool_calls"]], pieces
        assert p.finish_reason("stop") == want_finish
    called = bool(full["tool_calls"])
    assert want_finish == ("tool_calls" if called and plan.mode in ("auto", "required") else "stop")
    if plan.mode == "named":
        assert json.loads(full["tool_calls"][0]["function"]["arguments"]) == {"city": "Lima"}


# ------------------------------------------------------------------ tool-call parser: linear (issue 25, S4)
_PIECES = [BEGIN, END, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "\n```json\n", "\n```",
           "f", "{}", "\n"]


def _regex_extract(text: str):
    """The parser as it was (three lazy groups): the reference for which calls a text holds."""
    import re

    call_re = re.compile(re.escape(_PIECES[2]) + r"(?P<type>.*?)" + re.escape(_PIECES[4]) + r"(?P<name>.*?)"
                         r"\n```json\n(?P<args>.*?)\n```" + re.escape(_PIECES[3]), re.DOTALL)
    head, sep, rest = text.partition(BEGIN)
    calls = [(m["name"], m["args"]) for m in call_re.finditer(rest.split(END)[0])] if sep else []
    return (head or None, calls) if calls else (text or None, [])


def test_tool_parser_finds_what_the_regex_found():
    """Random texts made of the markers and a little text: the linear scan finds the same calls as the
    regular expression it replaces, streamed (in random pieces) or not."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        text = BEGIN * (rng.random() < 0.8) + "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 14)))
        want = _regex_extract(text)
        got = DeepSeekV3ToolParser().extract(text)
        assert (got[0], _plain(got[1])) == want, text
        cuts = sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _stream_tools(pieces)[:2] == want, pieces


def test_tool_parser_is_linear_on_repeated_markers():
    """200 and 2000 repeated call markers (no call ever completes), parsed whole and streamed in 7-character
    deltas: the regex took ~40 s for 200 (and ~4 s at 100, growing as n^4). In a subprocess so that a
    regression fails by its timeout instead of hanging the suite."""
    import subprocess
    import sys

    unit = "<｜tool▁call▁begin｜>f<｜tool▁sep｜>x\n```json\n"
    code = ("import time\nfrom dsv3.serve.tools import DeepSeekV3ToolParser\nout = []\n"
            f"for n in (200, 2000):\n    text = {BEGIN!r} + {unit!r} * n\n    t0 = time.perf_counter()\n"
            "    DeepSeekV3ToolParser().extract(text)\n    st = DeepSeekV3ToolParser().stream()\n"
            "    for i in range(7, len(text) + 7, 7):\n        st.feed(text[:i], i >= len(text))\n"
            "    out.append(time.perf_counter() - t0)\nprint(out)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    t200, t2000 = json.loads(r.stdout)
    assert t2000 < 2.0, (t200, t2000)  # linear: a few ms for 2000 (80,000 characters, 11,000 deltas)


def test_required_calls_of_a_cut_array():
    """tool_choice "required" output cut by max_tokens inside its JSON array: the complete calls are returned
    (a client got none: tool_calls [] and the cut text as content); nothing complete: not parsed."""
    plan = plan_tools(TOOLS, "required", None)
    one, two = '{"name": "now", "parameters": {}}', '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for text, want in [("[" + one + ", " + two + ", " + '{"name": "now", "param', ["now", "get_weather"]),
                       (" [" + one + ",\n" + two, ["now", "get_weather"]),
                       ("[" + one, ["now"]),
                       ('[{"name": "no', None), ("[", None), ("", None), ('{"name": "now"', None)]:
        calls = calls_from_json(text, plan)
        assert (None if calls is None else [c["function"]["name"] for c in calls]) == want, text
    assert _plain(calls_from_json("[" + one + ", " + two, plan_tools(TOOLS, "required", False))) == [("now", "{}")]
