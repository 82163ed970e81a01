"""The DeepSeek-V3.1 chat format against the prompts DeepSeek documents (model card examples)."""

from __future__ import annotations

import json

import pytest

from dsv3.data.chat_v31 import is_v31_template, render_chat_v31, tool_description
from dsv3.errors import UserError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CARD = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "<think>Hmm</think>I am DeepSeek"},
    {"role": "user", "content": "1+1=?"},
]


@pytest.mark.parametrize("thinking,tail", [(True, "<think>"), (False, "</think>")])
def test_model_card_multi_turn(thinking, tail):
    """The model card's `apply_chat_template(messages, thinking=..., add_generation_prompt=True)` outputs."""
    want = (f"{BOS}You are a helpful assistant<｜User｜>Who are you?<｜Assistant｜></think>I am DeepSeek{EOS}"
            f"<｜User｜>1+1=?<｜Assistant｜>{tail}")
    assert render_chat_v31(CARD, thinking=thinking) == want


def test_first_turn_prefixes():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_chat_v31(msgs) == f"{BOS}S<｜User｜>Q<｜Assistant｜></think>"
    assert render_chat_v31(msgs, thinking=True) == f"{BOS}S<｜User｜>Q<｜Assistant｜><think>"
    assert render_chat_v31(msgs, add_generation_prompt=False) == f"{BOS}S<｜User｜>Q"


def test_tools_and_tool_round_trip():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    desc = tool_description(tools)
    assert desc.startswith("## Tools\nYou have access to the following tools:\n\n### get_weather\nDescription: Weather of a city.\n\n"
                           'Parameters: {"type": "object", "properties": {"city": {"type": "string"}}}\n\nIMPORTANT: ALWAYS')
    assert desc.endswith("- For multiple tool calls, chain them directly without separators or spaces\n")
    assert "{{additional_tool_calls}}" in desc
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"}]
    text = render_chat_v31(msgs, tools=tools)
    assert text == (f"{BOS}S\n\n{desc}<｜User｜>Weather in Paris and Rome?<｜Assistant｜></think>"
                    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
                    '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Rome"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
                    f"{EOS}<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁output▁begin｜>rain<｜tool▁output▁end｜>")
    # the answer after the tool outputs continues without an Assistant tag
    done = render_chat_v31(msgs + [{"role": "assistant", "content": "Sunny, then rain."}], add_generation_prompt=False)
    assert done.endswith(f"<｜tool▁output▁end｜>Sunny, then rain.{EOS}")


def test_errors_and_detection():
    with pytest.raises(UserError, match=r"messages\[0\]: unknown role 'robot'"):
        render_chat_v31([{"role": "robot", "content": "x"}])
    with pytest.raises(UserError, match=r"tools\[0\]"):
        tool_description([{"type": "function"}])
    assert not is_v31_template(None)
    assert is_v31_template("{% if not thinking is defined %}...'<｜Assistant｜></think>'...<｜tool▁sep｜>")
    from dsv3.data.tokenizer import chat_template_jinja

    assert not is_v31_template(chat_template_jinja())  # V3's template


def test_tokenizer_picks_v31_from_the_checkpoint_template(tmp_path):
    """A tokenizer_config.json with V3.1's template switches `apply_chat_template` to V3.1 (thinking and
    tools honoured), and `save_tokenizer` keeps that template; V3's stays V3."""
    from dsv3.data.tokenizer import load_tokenizer, save_tokenizer

    try:
        base = load_tokenizer()
    except UserError as e:
        pytest.skip(str(e))
    assert base.chat_format == "deepseek_v3"
    v31_template = "{% if not thinking is defined %}{% set thinking = false %}{% endif %}...<｜Assistant｜></think>...<｜tool▁sep｜>"
    (tmp_path / "tokenizer.json").write_text(base.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": v31_template}), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "deepseek_v31"
    assert tok.apply_chat_template(CARD, thinking=True).endswith("<｜User｜>1+1=?<｜Assistant｜><think>")
    ids = tok.apply_chat_template(CARD, tokenize=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[-2:], skip_special_tokens=False) == "<｜Assistant｜></think>"
    save_tokenizer(tok, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == v31_template
