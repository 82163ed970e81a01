"""DeepSeek-V3.1 served as vLLM serves it: `chat_template_kwargs: {"thinking": ...}` switches the prompt's
`<think>` / `</think>` opener (the same ids `LLM.chat` renders), `--reasoning-parser deepseek_v3` splits
reasoning only for thinking requests, tools are described by the V3.1 template, and a V3.1 tool call
round-trips through the real server with the `openai` client (the call, then its result in the history).
The tiny checkpoint carries a V3.1 chat template in tokenizer_config.json, which selects the format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_helpers import API_KEY, MODEL_NAME, ServerThread, named_tool_call, write_tiny_model

V31_TEMPLATE = "{% if not thinking is defined %}{% set thinking = false %}{% endif %}<｜Assistant｜></think><｜tool▁sep｜>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def v31(tmp_path_factory):
    from dsv3.infer.engine import LLMEngine
    from dsv3.serve.app import build_app

    d = write_tiny_model(tmp_path_factory.mktemp("tiny_v31"))
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf["chat_template"] = V31_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    engine = LLMEngine.from_pretrained(d, dtype="float32", device="cpu", max_num_seqs=8)
    assert engine.tokenizer.chat_format == "deepseek_v31"
    app = build_app(engine, MODEL_NAME, api_key=API_KEY, reasoning_parser="deepseek_v3")
    with ServerThread(app) as s:
        import openai

        yield openai.OpenAI(base_url=s.url, api_key=API_KEY, max_retries=0, timeout=120), engine, d


def _ask(client, thinking, **kw):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "1+1=?"}], max_tokens=8, temperature=0,
        extra_body={"chat_template_kwargs": {"thinking": thinking}, "ignore_eos": True}, **kw)


def test_thinking_switch_reaches_prompt_and_reasoning_parser(v31):
    from dsv3 import LLM, SamplingParams

    client, engine, d = v31
    on, off = _ask(client, True), _ask(client, False)
    # thinking: the prompt ends with <think>, so everything generated (no </think> from a random model) is reasoning
    assert on.choices[0].message.content is None and on.choices[0].message.reasoning_content
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None
    tok = engine.tokenizer
    ids_on = tok.apply_chat_template([{"role": "user", "content": "1+1=?"}], tokenize=True, thinking=True)
    assert tok.decode(ids_on[-2:], skip_special_tokens=False) == "<｜Assistant｜><think>"
    assert on.usage.prompt_tokens == len(ids_on)
    # the same ids as LLM.chat with the same switch: the same greedy text
    llm = LLM(str(d), dtype="float32")
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for thinking, resp in ((True, on), (False, off)):
        text = llm.chat([{"role": "user", "content": "1+1=?"}], sp, chat_template_kwargs={"thinking": thinking})[0].outputs[0].text
        got = resp.choices[0].message.reasoning_content if thinking else resp.choices[0].message.content
        assert text == got
    assert on.choices[0].message.reasoning_content != off.choices[0].message.content  # the opener changed the prompt


def test_v31_tool_call_round_trip(v31):
    client, engine, _ = v31
    call = named_tool_call(client, TOOLS, "Weather in Paris?")
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=6, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the server rendered the V3.1 format: tools in the system prompt, the call without type or fence
    prompt = engine.tokenizer.apply_chat_template(history, tools=TOOLS)
    assert second.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert f"<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{call.function.arguments}<｜tool▁call▁end｜>" in prompt
    assert "## Tools\nYou have access to the following tools:\n\n### get_weather" in prompt
    assert prompt.endswith("<｜tool▁output▁begin｜>sunny, 21 C<｜tool▁output▁end｜>")


def test_v31_auto_tool_calls_are_parsed_whole_and_streamed():
    from dsv3.serve.tools import V31_CALL, DeepSeekV3ToolParser

    text = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}"
            "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Rome\"}<｜tool▁call▁end｜>"
            "<｜tool▁calls▁end｜>")
    parser = DeepSeekV3ToolParser(V31_CALL)
    content, calls = parser.extract(text)
    assert content == "Let me check." and [c["function"]["arguments"] for c in calls] == ['{"city": "Paris"}', '{"city": "Rome"}']
    stream, got, sent = parser.stream(), [], ""
    for i in range(1, len(text) + 1, 7):
        d, new = stream.feed(text[:i], False)
        sent += d
        got += new
    d, new = stream.feed(text, True)
    assert sent + d == "Let me check." and [c["function"]["name"] for c in got + new] == ["get_weather"] * 2


def test_template_kwargs_are_checked(v31, client):
    import openai

    v31_client = v31[0]
    with pytest.raises(openai.BadRequestError, match="'enable_thinking' is not read"):
        v31_client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    with pytest.raises(openai.BadRequestError, match="has no thinking mode"):  # the V3 checkpoint
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    ok = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                        extra_body={"chat_template_kwargs": {"thinking": False}})
    assert ok.choices[0].message.content is not None
