"""DeepSeek-V3.2 served as vLLM serves it: a tiny random `deepseek_v32` checkpoint (sparse attention, no
Jinja chat template: the folder's config.json selects DeepSeek's encoding), the `openai` client over HTTP.
`chat_template_kwargs: {"thinking": ...}` picks the `<think>` / `</think>` opener (the same ids `LLM.chat`
renders), `--reasoning-parser deepseek_v3` splits reasoning only for thinking requests, a tool call
round-trips (DSML call and `<function_results>` in the next prompt), and DSML output is parsed into
tool_calls whole and streamed (forced with guided_regex: a random model writes no DSML by itself)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from serve_helpers import API_KEY, MODEL_NAME, REPO, ServerThread, _tokenizer_files, named_tool_call, randomize_

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"], "additionalProperties": False}}}]
DSML_REGEX = ('\\n\\n<｜DSML｜function_calls>\\n<｜DSML｜invoke name="get_weather">\\n'
              '<｜DSML｜parameter name="city" string="true">[a-z]{1,4}</｜DSML｜parameter>\\n'
              '</｜DSML｜invoke>\\n</｜DSML｜function_calls>')


def _write_tiny_v32(path):
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(REPO / "configs" / "tiny.yaml", ["model.max_position_embeddings=512", "model.index_topk=8",
                                                             "model.index_n_heads=2", "model.index_head_dim=32"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    randomize_(model, std=0.08, seed=0)
    model.save_pretrained(path)
    src = _tokenizer_files()
    shutil.copy(src / "tokenizer.json", path / "tokenizer.json")
    conf = json.loads((src / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)  # V3.2 ships no Jinja template
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    assert json.loads((path / "config.json").read_text())["model_type"] == "deepseek_v32"
    return path


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    from dsv3.infer.engine import LLMEngine
    from dsv3.serve.app import build_app

    d = _write_tiny_v32(tmp_path_factory.mktemp("tiny_v32"))
    engine = LLMEngine.from_pretrained(d, dtype="float32", device="cpu", max_num_seqs=8)
    assert engine.tokenizer.chat_format == "deepseek_v32"
    app = build_app(engine, MODEL_NAME, api_key=API_KEY, reasoning_parser="deepseek_v3")
    with ServerThread(app) as s:
        import openai

        yield openai.OpenAI(base_url=s.url, api_key=API_KEY, max_retries=0, timeout=120), engine, d


def test_thinking_switch_reaches_prompt_and_reasoning_parser(v32):
    from dsv3 import LLM, SamplingParams

    client, engine, d = v32
    msgs = [{"role": "user", "content": "1+1=?"}]
    on, off = (client.chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=8, temperature=0,
        extra_body={"chat_template_kwargs": {"thinking": t}, "ignore_eos": True}) for t in (True, False))
    assert on.choices[0].message.content is None and on.choices[0].message.reasoning_content
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None
    tok = engine.tokenizer
    ids_on = tok.apply_chat_template(msgs, tokenize=True, thinking=True)
    assert tok.decode(ids_on, skip_special_tokens=False) == "<｜begin▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>"
    assert on.usage.prompt_tokens == len(ids_on)
    llm = LLM(str(d), dtype="float32")  # the same ids as LLM.chat with the switch: the same greedy text
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert llm.chat(msgs, sp, chat_template_kwargs={"thinking": True})[0].outputs[0].text == on.choices[0].message.reasoning_content


def test_tool_call_round_trip(v32):
    client, engine, _ = v32
    call = named_tool_call(client, TOOLS, "Weather in Paris?")
    city = json.loads(call.function.arguments)["city"]
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "reasoning_content": "I should look it up.",
                "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=6, temperature=0,
                                            extra_body={"chat_template_kwargs": {"thinking": True}})
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the server rendered V3.2's encoding: tools in a system prompt, the call in DSML with its reasoning
    # (thinking mode, after the last user turn), the result block, and the <think> opener after it
    prompt = engine.tokenizer.apply_chat_template(history, tools=TOOLS, thinking=True)
    assert second.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert prompt.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n") and '{"name": "get_weather", "description"' in prompt
    assert ('<｜Assistant｜><think>I should look it up.</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
            f'<｜DSML｜parameter name="city" string="true">{city}</｜DSML｜parameter>\n</｜DSML｜invoke>') in prompt
    assert prompt.endswith("<function_results>\n<result>sunny, 21 C</result>\n</function_results>\n\n<think>")


def test_dsml_output_becomes_tool_calls_whole_and_streamed(v32):
    client = v32[0]
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=60,
              temperature=0, extra_body={"guided_regex": DSML_REGEX})
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and list(args) == ["city"] and isinstance(args["city"], str)
    content, calls = "", []
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
    assert content == "" and [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", call.function.arguments)]
