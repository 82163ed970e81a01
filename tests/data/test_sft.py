"""SFT data: chat-template rendering with reply-only loss masks, `dsv3 preprocess --dataset-type`,
one-line errors naming file/line/field, packing/padding and the too-long rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dsv3.cli import main
from dsv3.data.chat_template import render_chat
from dsv3.data.sft import encode_file, load_sft_samples, to_messages, write_sft_dataset
from dsv3.data.sft_dataset import build_sft_dataset, plan, split_indices

CHAT = {"system": "You are terse.", "messages": [
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": [{"type": "text", "text": "again"}]}, {"role": "assistant", "content": "sure thing"}]}
QA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
      {"instruction": "Name a colour.", "output": "Blue."}]


def _write(path: Path, records, array: bool = False) -> Path:
    path.write_text(json.dumps(records, indent=1) if array else "\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_ids_equal_the_whole_rendered_conversation_and_mask_covers_replies(tokenizer, tmp_path):
    f = _write(tmp_path / "mix.jsonl", QA + [CHAT])
    encoded = list(encode_file(f, tokenizer))
    assert len(encoded) == 3
    for (ids, mask), rec in zip(encoded, QA + [CHAT]):
        msgs = to_messages(rec, "chat" if "messages" in rec else "qa", "x")
        full = render_chat(msgs, add_generation_prompt=False, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        assert ids.tolist() == tokenizer.encode(full)  # piecewise tokenisation == whole string
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and mask[-1] == 1 and mask[0] == 0
    ids, mask = encoded[0]
    assert tokenizer.decode(ids[mask == 1], skip_special_tokens=False) == "5" + tokenizer.eos_token
    assert "Add the numbers.\n\n2 and 3" in tokenizer.decode(ids[mask == 0], skip_special_tokens=False)
    ids, mask = encoded[2]
    trained = tokenizer.decode(ids[mask == 1], skip_special_tokens=False)
    assert trained == f"hello!{tokenizer.eos_token}sure thing{tokenizer.eos_token}"
    prompt = tokenizer.decode(ids[mask == 0], skip_special_tokens=False)
    assert prompt.startswith(tokenizer.bos_token + "You are terse.<｜User｜>hi<｜Assistant｜>")


def test_preprocess_cli_writes_memory_mapped_ids_and_mask(tokenizer_dir, tmp_path, capsys):
    f = _write(tmp_path / "alpaca.json", QA, array=True)
    assert main(["preprocess", "--dataset-type", "qa", "--input", str(f), "--output-prefix", str(tmp_path / "sft"),
                 "--tokenizer", str(tokenizer_dir)]) == 0
    assert "2 samples" in capsys.readouterr().out
    s = load_sft_samples(tmp_path / "sft")
    direct = list(encode_file(f, __import__("dsv3.data.tokenizer", fromlist=["x"]).load_tokenizer(tokenizer_dir)))
    assert len(s) == 2 and all(np.array_equal(s.ids(i), direct[i][0]) for i in range(2))
    labels = s.labels(1)
    assert (labels[s.mask(1) == 0] == -100).all() and (labels[s.mask(1) == 1] == s.ids(1)[s.mask(1) == 1]).all()


@pytest.mark.parametrize("records,array,expect", [
    ([QA[0], {"instruction": "x"}], False, "line 2: field 'output' is missing"),
    ([QA[0], {"instruction": "x", "output": "  "}], False, "line 2: field 'output' is empty"),
    ([QA[0], {"instruction": "x", "output": 3}], False, "line 2: field 'output' is a int"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}], False,
     "line 1: field messages[1].content: empty assistant reply"),
    ([{"messages": [{"role": "user", "content": "q"}]}], False, "line 1: field 'messages' has no assistant reply"),
    ([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, {"role": "assistant", "content": "a"}]}],
     False, "line 1: cannot render with the chat template: messages[0]: content part of type 'image_url'"),
    ([{"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]}], False, "unknown role 'narrator'"),
    ([QA[0], QA[1], {"instruction": "x"}], True, "line 11: field 'output' is missing"),
])
def test_bad_records_one_line_nothing_written(tokenizer_dir, tmp_path, capsys, records, array, expect):
    f = _write(tmp_path / ("bad.json" if array else "bad.jsonl"), records, array)
    rc = main(["preprocess", "--dataset-type", "chat" if "messages" in records[0] else "qa", "--input", str(f),
               "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(f) in err and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name]  # nothing half-written


_S = '"\\ud800"'  # a JSON string holding a lone surrogate
_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name,text,expect", [
    ("out.jsonl", '{"instruction": "a", "output": %s}\n' % _S, "line 1: field output holds a lone surrogate ('\\ud800')"),
    ("sys.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a", "system": %s, "output": "b"}]' % _S,
     "line 2: field system holds a lone surrogate"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}, '
     '{"role": "assistant", "content": "b"}]}\n' % _S, "line 1: field messages[0].content[0].text holds a lone surrogate"),
    ("args.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"type": "function", '
     '"function": {"name": "f", "arguments": {"k": %s}}}]}]}\n' % _S,
     "line 1: field messages[1].tool_calls[0].function.arguments.k holds a lone surrogate"),
    ("key.jsonl", '{%s: 1, "instruction": "a", "output": "b"}\n' % _S, "line 1: a key of the record holds a lone surrogate"),
    ("deep.jsonl", '{"instruction": "a", "output": "b"}\n' + _DEEP + "\n", "line 2: JSON nested too deeply"),
    ("deep.json", "[\n" + _DEEP + "]", "line 2: JSON nested too deeply"),
], ids=["output", "system", "content-part", "tool-arguments", "key", "deep-jsonl", "deep-json"])
def test_hostile_json_one_line_nothing_written(tokenizer_dir, tmp_path, capsys, name, text, expect):
    """Lone surrogates (any field, keys too) and 100k-deep nesting: one line naming file, line and
    field, never a traceback (issue 25 S7)."""
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    rc = main(["preprocess", "--dataset-type", "chat" if "messages" in text else "qa", "--input", str(f),
               "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"{f}: {expect}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name]  # nothing half-written


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json"])
def test_utf8_bom_is_skipped(tokenizer, tmp_path, array):
    plain = _write(tmp_path / f"plain.{'json' if array else 'jsonl'}", QA, array)
    bom = tmp_path / f"bom{plain.suffix}"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    got, want = list(encode_file(bom, tokenizer)), list(encode_file(plain, tokenizer))
    assert len(got) == 2 and all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want))


def test_bad_json_names_the_line(tokenizer, tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(QA[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"x.jsonl: line 2: not valid JSON"):
        list(encode_file(f, tokenizer))


class _Samples:
    def __init__(self, lens, prompt=2):
        self._ids = [np.arange(100, 100 + n) for n in lens]
        self._mask = [np.r_[np.zeros(prompt), np.ones(n - prompt)].astype(np.uint8) for n in lens]

    def ids(self, i):
        return self._ids[i]

    def mask(self, i):
        return self._mask[i]


def test_packing_resets_positions_and_confines_documents():
    s = _Samples([5, 4, 6, 3])
    packs, st = plan(s, np.arange(4), seq_length=8, packing=True, overlong="truncate")
    assert packs == [[(0, 5), (1, 4)], [(2, 6), (3, 3)]] and st.sequences == 2 and st.truncated == st.dropped == 0
    ds = build_sft_dataset(s, np.arange(4), 8, pad_id=1, packing=True, overlong="truncate", seed=None, name="t")
    it = ds[0]
    assert it["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0] and it["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert it["tokens"].tolist()[:7] == [100, 101, 102, 103, 100, 101, 102] and it["tokens"][7] == 1
    assert it["labels"].tolist()[:7] == [101, 102, 103, 104, 101, 102, 103]
    assert it["loss_mask"].tolist() == [0, 1, 1, 1, 0, 1, 1, 0]  # mask[1:] of each sample; padding 0
    padded = build_sft_dataset(s, np.arange(4), 8, pad_id=1, packing=False, overlong="truncate", seed=None, name="t")
    assert len(padded) == 4 and "doc_ids" not in padded[0] and padded[0]["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]


def test_too_long_samples_truncated_or_dropped_and_counted():
    s = _Samples([12, 4, 20], prompt=2)
    s._mask[2][:] = 0
    s._mask[2][15:] = 1  # its reply lies beyond seq_length + 1: nothing left after truncation
    packs, st = plan(s, np.arange(3), seq_length=8, packing=False, overlong="truncate")
    assert packs == [[(0, 9)], [(1, 4)]] and (st.truncated, st.dropped) == (2, 1)
    assert "2 truncated, 1 dropped" in st.line("x", 8, False, "truncate")
    packs, st = plan(s, np.arange(3), seq_length=8, packing=True, overlong="drop")
    assert packs == [[(1, 4)]] and (st.truncated, st.dropped) == (0, 2)


def test_held_out_split_is_deterministic_and_disjoint():
    a, b = split_indices(50, 0.1, seed=3)
    a2, b2 = split_indices(50, 0.1, seed=3)
    assert len(b) == 5 and not set(a) & set(b) and len(a) + len(b) == 50 and (a == a2).all() and (b == b2).all()
    assert len(split_indices(5, 0.01, 0)[1]) == 1


def test_write_needs_an_existing_directory(tokenizer, tmp_path):
    f = _write(tmp_path / "a.jsonl", QA)
    with pytest.raises(Exception, match="output directory does not exist"):
        write_sft_dataset(f, str(tmp_path / "nope" / "x"), tokenizer)
