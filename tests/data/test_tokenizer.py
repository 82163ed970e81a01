"""Tokenizer: known ids, loading paths, streaming detokenisation, the V3 chat template."""

from __future__ import annotations

import json

import pytest

from dsv3.data.chat_template import render_chat
from dsv3.data.tokenizer import load_tokenizer
from dsv3.errors import UserError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def test_known_ids(tokenizer):
    # Spot checks from shared/data/README.md (match splintr's V3 vocab extracted from the HF hub).
    assert tokenizer.encode("Hello world") == [19923, 2058]
    assert tokenizer.encode("你好世界") == [30594, 3427]
    assert tokenizer.encode("Hello world", add_bos=True) == [0, 19923, 2058]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 128815)
    assert tokenizer.token_to_id("<｜User｜>") == 128803
    assert tokenizer.token_to_id("<｜Assistant｜>") == 128804
    assert tokenizer.id_to_token(1) == EOS
    assert tokenizer.encode_batch(["Hello world", "你好世界"], add_bos=True) == [[0, 19923, 2058], [0, 30594, 3427]]
    assert tokenizer.decode([0, 19923, 2058, 1]) == "Hello world"
    assert tokenizer.decode([0, 19923, 2058, 1], skip_special_tokens=False) == f"{BOS}Hello world{EOS}"


def test_load_paths(tokenizer_json, tokenizer_dir, monkeypatch, tmp_path):
    a = load_tokenizer(tokenizer_json)  # plain file
    b = load_tokenizer(tokenizer_dir / "tokenizer.json.xz")  # compressed file
    monkeypatch.setenv("DSV3_TOKENIZER", str(tokenizer_json.parent))  # directory via env
    c = load_tokenizer()
    text = "DeepSeek-V3 uses MLA and 中文 😀."
    assert a.encode(text) == b.encode(text) == c.encode(text)
    monkeypatch.delenv("DSV3_TOKENIZER")
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        load_tokenizer(bad)


def test_incremental_decoder_multibyte(tokenizer):
    text = "Streaming 中文字符 and emoji 😀🎉 ünïcödé, then plain words.\nNew line."
    ids = tokenizer.encode(text)
    dec = tokenizer.incremental_decoder()
    pieces = [dec.step(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # at least one emoji is split over several byte-level tokens, so some steps must emit nothing
    assert any(p == "" for p in pieces[:-1])


def test_incremental_decoder_flushes_incomplete_utf8(tokenizer):
    ids = tokenizer.encode("a😀")
    dec = tokenizer.incremental_decoder()
    out = "".join(dec.step(i) for i in ids[:-1])  # stop inside the emoji's bytes
    assert out == "a"
    assert dec.flush() == tokenizer.decode(ids[:-1])[1:]


def test_chat_template_golden(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(msgs) == f"{BOS}S<｜User｜>Hi<｜Assistant｜>"
    multi = [
        {"role": "system", "content": "A"},
        {"role": "system", "content": [{"type": "text", "text": "B"}]},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more"},
    ]
    assert render_chat(multi, add_generation_prompt=False) == (
        f"{BOS}A\n\nB<｜User｜>x\ny<｜Assistant｜>ok{EOS}<｜User｜>more"
    )
    tools = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "25C"},
    ]
    call = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{}\n```<｜tool▁call▁end｜>"
    calls = call.format('{"city": "Paris"}') + "\n" + call.format('{"city": "Rome"}')
    outs = "<｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>25C<｜tool▁output▁end｜>"
    assert render_chat(tools) == (
        f"{BOS}<｜User｜>weather?<｜Assistant｜><｜tool▁calls▁begin｜>{calls}<｜tool▁calls▁end｜>{EOS}"
        f"<｜tool▁outputs▁begin｜>{outs}<｜tool▁outputs▁end｜>"  # no generation prompt after tool outputs
    )
    final = tools + [{"role": "assistant", "content": "Paris 18C, Rome 25C"}]
    assert render_chat(final).endswith(f"{outs}<｜tool▁outputs▁end｜>Paris 18C, Rome 25C{EOS}<｜Assistant｜>")
    with pytest.raises(UserError, match="image_url"):
        render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(UserError, match="unknown role"):
        render_chat([{"role": "narrator", "content": "x"}])


def test_chat_template_matches_stock_jinja(tokenizer_dir, tokenizer):
    """Against the Jinja template shipped in tokenizer_config.json (an independent oracle), on
    conversations where V3 and that (R1-era) template agree: no `</think>`, one tool output per round."""
    jinja2 = pytest.importorskip("jinja2")
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tmpl = jinja2.Environment().from_string(cfg["chat_template"])
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
        [{"role": "user", "content": "w?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"type": "function", "function": {"name": "g", "arguments": '{"a": 1}'}}]},
         {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}],
        [{"role": "user", "content": "w?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "content": "r"}],
    ]
    for msgs in convs:
        for gen in (True, False):
            ref = tmpl.render(messages=msgs, add_generation_prompt=gen, bos_token=BOS)
            assert render_chat(msgs, add_generation_prompt=gen) == ref


def test_chat_tokens_no_double_bos(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id
    assert ids == [0, 128803] + tokenizer.encode("Hi") + [128804]
