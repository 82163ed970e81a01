"""Guided decoding (structured output) on a random-weight tiny V3 with the real DeepSeek-V3 tokenizer:
whatever the weights, the output obeys the JSON schema / json_object / regex / choice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from infer_helpers import LLMEngine, SamplingParams

from dsv3.infer.sampling import GuidedDecodingParams

pytest.importorskip("llguidance", reason="guided decoding needs llguidance (pip install dsv3[serve])")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25},  # bounded digits
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "score", "role", "address", "tags", "scores"],
    "additionalProperties": False,
}


SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "kind": {"enum": ["x", "y"]}},
         "required": ["ok", "n", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from dsv3.data.tokenizer import load_tokenizer

    d = data_dir / "deepseek_v3_tokenizer"
    if not d.is_dir():
        pytest.skip(f"the DeepSeek-V3 tokenizer is not at {d} (set DSV3_DATA_DIR)")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def engine(tokenizer):
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")  # 129,280 vocab
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.reset_parameters(std=0.05)
    return LLMEngine(m.eval(), tokenizer, max_num_seqs=20, num_gpu_blocks=256, block_size=16)


def _run(engine, prompts, params) -> dict[str, list]:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"g{i}", p, None, sp)
    done = {}
    for _ in range(2000):  # bounded
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
    return [done[f"g{i}"] for i in range(len(prompts))]


def test_json_schema_20_prompts_all_valid(engine):
    prompts = [f"Person {i}: give me a JSON record." for i in range(20)]
    g = GuidedDecodingParams(json=SCHEMA)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=150, guided_decoding=g) for i in range(20)]
    outs = _run(engine, prompts, params)
    for (c,) in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for (c,) in outs}) > 10  # sampled, not one forced string
    assert engine.cache_info()["used_blocks"] == 0


def test_json_object_and_schema_text(engine):
    g_obj = GuidedDecodingParams(json_object=True)
    g_txt = GuidedDecodingParams(json=json.dumps(SMALL))
    outs = _run(engine, ["json:", "json:"], [SamplingParams(temperature=1.0, seed=1, n=4, max_tokens=40, guided_decoding=g_obj),
                                             SamplingParams(temperature=0.7, seed=3, n=3, max_tokens=60, guided_decoding=g_txt)])
    for c in outs[0]:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # a random model may write one object longer than 40 tokens: what it wrote obeys the grammar
            _check_prefix(engine, g_obj, c.token_ids)
    assert len(outs[1]) == 3
    for c in outs[1]:
        jsonschema.validate(json.loads(c.text), SMALL)


def _check_prefix(engine, g, token_ids):
    m = engine._grammar_matcher(SamplingParams(guided_decoding=g))
    assert all(m.consume_token(t) for t in token_ids) and not m.is_error()


def test_regex_and_choice(engine):
    rx = GuidedDecodingParams(regex=r"[a-z]{2,5}-\d{3}")
    ch = GuidedDecodingParams(choice=["yes", "no", "maybe so"])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, guided_decoding=rx) for i in range(4)]
    params += [SamplingParams(temperature=1.0, seed=i, max_tokens=30, guided_decoding=ch) for i in range(4)]
    outs = _run(engine, ["code:"] * 8, params)
    for (c,) in outs[:4]:
        assert re.fullmatch(r"[a-z]{2,5}-\d{3}", c.text), c.text
    for (c,) in outs[4:]:
        assert c.text in ("yes", "no", "maybe so") and c.finish_reason == "stop"


def test_guided_survives_preemption(tokenizer):
    """A cache too small for every sequence: preempted guided sequences are recomputed and stay valid."""
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    torch.manual_seed(1)
    m = Transformer(cfg)
    m.reset_parameters(std=0.05)
    eng = LLMEngine(m.eval(), tokenizer, max_num_seqs=4, num_gpu_blocks=10, block_size=4)
    g = GuidedDecodingParams(json=SMALL)
    outs = _run(eng, ["record:"] * 4, [SamplingParams(temperature=1.0, seed=10 + i, max_tokens=30, guided_decoding=g) for i in range(4)])
    assert eng.scheduler.num_preemptions > 0
    for (c,) in outs:
        jsonschema.validate(json.loads(c.text), SMALL)


@pytest.mark.parametrize("g, word", [
    (GuidedDecodingParams(json={"type": "foo"}), "json"),
    (GuidedDecodingParams(json="{not json"), "not valid JSON"),
    (GuidedDecodingParams(regex="[a-"), "regex"),
    (GuidedDecodingParams(choice=[]), "choice"),
    (GuidedDecodingParams(), "exactly one of"),
    (GuidedDecodingParams(regex="a", choice=["a"]), "exactly one of"),
])
def test_bad_grammars_are_value_errors(engine, g, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(guided_decoding=g).validate()
    with pytest.raises(ValueError, match=word):
        engine.add_request("bad", "x", None, SamplingParams(guided_decoding=g))
    assert not engine.has_unfinished_requests()


def test_missing_llguidance_is_one_install_line(monkeypatch):
    import sys

    from dsv3.infer import guided

    guided.grammar_text.cache_clear()
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"pip install dsv3\[serve\]"):
        SamplingParams(guided_decoding=GuidedDecodingParams(regex="a+")).validate()


def test_failing_grammar_ends_its_sequence_only(engine):
    """Same batch: the grammar that hits llguidance's lexer limit ends its own sequence with 'error'
    (one line, nothing of the grammar); the sequence beside it runs to max_tokens; the failed template
    left the cache, so the same grammar fails the same way again (never a silent empty output)."""
    bad = GuidedDecodingParams(regex="(a{1000}){1003}")
    for _ in range(2):
        outs = _run(engine, ["innocent", "attacker"], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                                       SamplingParams(temperature=0, max_tokens=12, guided_decoding=bad)])
        (ok,), (failed,) = outs
        assert ok.finish_reason == "length" and len(ok.token_ids) == 12 and ok.error is None
        assert failed.finish_reason == "error" and len(failed.token_ids) < 12 and set(failed.text) <= {"a"}
        assert failed.error.startswith("guided decoding failed") and "\n" not in failed.error and "1003" not in failed.error
    assert engine.cache_info()["used_blocks"] == 0


def test_choice_over_the_parsers_row_limit(engine):
    """5000 strings (llguidance allows 2000 items per parser row: as rule alternatives they failed on
    the first token) decode as one terminal."""
    choices = [f"c{i}" for i in range(5000)]
    (c,), = _run(engine, ["pick:"], [SamplingParams(temperature=1.0, seed=0, max_tokens=8,
                                                    guided_decoding=GuidedDecodingParams(choice=choices))])
    assert c.finish_reason == "stop" and c.text in choices


OPEN_SCHEMAS = [
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}, "note": {"type": "string"}},
     "required": ["when"]},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "number"}},
                                "required": ["k", "v"]}, "minItems": 1},
    {"type": "object", "properties": {"meta": {"type": "object"}, "ids": {"type": "array", "items": {"type": "integer"}}},
     "required": ["meta", "ids"]},
    {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"type": ["string", "null"]}}}]},
]


@pytest.mark.parametrize("schema", OPEN_SCHEMAS)
def test_open_schemas_close_within_max_tokens(engine, schema):
    """Whatever a schema leaves open, sampled output of a random model closes within max_tokens and validates."""
    g = GuidedDecodingParams(json=schema)
    outs = _run(engine, ["data:"] * 4, [SamplingParams(temperature=1.0, seed=i, max_tokens=64, guided_decoding=g)
                                        for i in range(4)])
    for (c,) in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
