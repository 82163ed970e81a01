"""The offline `LLM` API and the `dsv3 generate` CLI on a tiny checkpoint with the real V3 tokenizer."""

from __future__ import annotations

import io
import sys

import pytest

import dsv3
from dsv3 import LLM, SamplingParams
from dsv3.cli import main as cli_main


@pytest.fixture(scope="module")
def llm(tiny_tok_ckpt):
    return LLM(str(tiny_tok_ckpt), max_num_seqs=4, num_gpu_blocks=64, block_size=16)


def test_public_imports():
    assert dsv3.LLM is LLM and dsv3.SamplingParams is SamplingParams


def test_generate_text_and_ids(llm):
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(["The capital of France is", "请介绍一下北京的景点"], sp)
    assert [o.prompt for o in outs] == ["The capital of France is", "请介绍一下北京的景点"]
    for o in outs:
        assert o.finished and o.prompt_token_ids[0] == tok.bos_id  # completion prompts start with BOS
        c = o.outputs[0]
        assert len(c.token_ids) == 8 and c.finish_reason == "length"
        assert c.text == tok.decode(c.token_ids)
    # token-id prompts give the same result as the text
    again = llm.generate([outs[0].prompt_token_ids], sp)[0]
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_generate_accepts_vllm_prompt_dicts(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ref = llm.generate(["The capital of France is"], sp)[0]
    outs = llm.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": ref.prompt_token_ids}], sp)
    assert [o.outputs[0].token_ids for o in outs] == [ref.outputs[0].token_ids] * 2
    assert outs[0].prompt == "The capital of France is" and outs[1].prompt is None
    single = llm.generate({"prompt_token_ids": ref.prompt_token_ids}, sp)  # one dict, as vLLM accepts
    assert single[0].outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt 1: a prompt dict needs"):
        llm.generate([{"prompt": "a"}, {"text": "b"}], sp)


def test_chat_uses_v3_template(llm):
    tok = llm.get_tokenizer()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    ids = llm.chat_prompt(msgs)
    assert tok.decode(ids, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜>"
    assert ids.count(tok.bos_id) == 1
    out = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert out[0].prompt_token_ids == ids and len(out[0].outputs[0].token_ids) == 4
    two = llm.chat([msgs, [{"role": "user", "content": "Hello"}]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert len(two) == 2 and two[0].outputs[0].token_ids == out[0].outputs[0].token_ids[:2]


def test_generate_bad_prompt_raises_and_engine_stays_usable(llm):
    with pytest.raises(ValueError, match="prompt 1: .*top_p"):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2), SamplingParams(top_p=2.0)])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.cache_info()["free_blocks"] == 64
    assert len(llm.generate("ok", SamplingParams(max_tokens=2))) == 1


def _cli(argv, stdin: str | None = None, monkeypatch=None, capsys=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_generate_streams_and_reports(tiny_tok_ckpt, llm, capsys, monkeypatch):
    rc, out, err = _cli(["generate", "--model", str(tiny_tok_ckpt), "--input", "请介绍一下北京的景点", "--max-tokens", "6",
                         "--ignore-eos", "--num-blocks", "32"], capsys=capsys)
    assert rc == 0
    want = llm.chat([{"role": "user", "content": "请介绍一下北京的景点"}], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert out == want[0].outputs[0].text + "\n"
    assert "B/token" in err and "blocks" in err and "tok/s" in err


def test_cli_predict_yaml(tiny_tok_ckpt, tmp_path, capsys):
    yaml = tmp_path / "predict.yaml"
    yaml.write_text(f"seed: 0\nload_checkpoint: '{tiny_tok_ckpt / 'model.safetensors'}'\nmodel:\n  model_config:\n"
                    f"    max_decode_length: 5\n    do_sample: False\n    top_k: 1\n    top_p: 1\n"
                    f"processor:\n  tokenizer:\n    tokenizer_file: '{tiny_tok_ckpt / 'tokenizer.json'}'\n")
    rc, out, err = _cli(["generate", "--config", str(yaml), "--input", "hello", "--max-tokens", "5", "--ignore-eos", "--quiet",
                       "--num-blocks", "32"], capsys=capsys)
    assert rc == 0 and out.endswith("\n") and len(out) > 1, err


def test_cli_interactive_keeps_history(tiny_tok_ckpt, capsys, monkeypatch):
    outs = []
    for extra in ([], ["--no-enable-prefix-caching"]):  # the history re-sent each turn: same replies either way
        rc, out, err = _cli(["generate", "--model", str(tiny_tok_ckpt), "--interactive", "--max-tokens", "3", "--ignore-eos", "--quiet",
                             "--num-blocks", "32", *extra], stdin="hi\nagain\n/clear\n/exit\n", monkeypatch=monkeypatch, capsys=capsys)
        assert rc == 0 and out.count("\n") == 2 and "interactive" in err
        outs.append(out)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("argv, word", [
    (["--model", "/nonexistent/dir", "--input", "x"], "no such checkpoint"),
    (["--input", "x"], "--model"),
    (["--top-p", "0", "--input", "x"], "top_p"),
])
def test_cli_errors_are_one_line(tiny_tok_ckpt, capsys, argv, word):
    if "--model" not in argv:
        argv = ["--model", str(tiny_tok_ckpt)] + argv if word != "--model" else argv
    rc, _, err = _cli(["generate", *argv], capsys=capsys)
    assert rc == 2 and word in err and err.count("\n") == 1
