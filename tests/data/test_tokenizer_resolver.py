"""One tokenizer rule for every entry point (`resolve_tokenizer`), and model folders that carry their
tokenizer: tokenizer.json + tokenizer_config.json whose Jinja chat template renders what dsv3 renders
(oracle: transformers' apply_chat_template)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dsv3.data.tokenizer import load_tokenizer, resolve_tokenizer, save_tokenizer
from dsv3.errors import UserError

REPO = Path(__file__).resolve().parents[2]
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "请介绍一下北京的景点"},
        {"role": "assistant", "content": "故宫。"}, {"role": "user", "content": "And Paris?"}]


@pytest.fixture(scope="module")
def tok():
    try:
        return load_tokenizer()
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    """Tiny random V3 with the real vocabulary, saved WITHOUT a tokenizer (as a training run's weights)."""
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    d = tmp_path_factory.mktemp("bare")
    torch.manual_seed(0)
    m = Transformer(load_model_config(REPO / "configs" / "tiny.yaml"))
    m.reset_parameters(std=0.05)
    m.save_pretrained(d)
    return d


def test_exported_chat_template_renders_like_dsv3(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for gen in (True, False):
        assert hf.apply_chat_template(CONV, tokenize=False, add_generation_prompt=gen) == tok.apply_chat_template(CONV, gen)
    again = load_tokenizer(tmp_path)
    assert again.bos_id == tok.bos_id and again.eos_id == tok.eos_id and again.encode("hello") == tok.encode("hello")


def test_one_resolver_for_every_entry_point(tok, bare_ckpt, tmp_path, monkeypatch):
    from dsv3.infer.llm import LLM
    from dsv3.serve.cli import load_engine

    monkeypatch.delenv("DSV3_TOKENIZER", raising=False)
    # no tokenizer in the folder: the installed one, since its ids fit the model's vocabulary
    assert resolve_tokenizer(None, bare_ckpt).name == tok.name
    llm = LLM(str(bare_ckpt), num_gpu_blocks=8)
    args = argparse.Namespace(model=str(bare_ckpt), tokenizer=None, dtype="auto", device="auto", max_num_seqs=1, max_model_len=None)
    engine = load_engine(args)
    assert llm.get_tokenizer().name == engine.tokenizer.name == tok.name
    # a folder's own tokenizer wins, for both
    own = tmp_path / "own"
    own.mkdir()
    for f in bare_ckpt.iterdir():
        (own / f.name).symlink_to(f)
    save_tokenizer(tok, own)
    assert LLM(str(own), num_gpu_blocks=8).get_tokenizer().name == load_engine(
        argparse.Namespace(**{**vars(args), "model": str(own)})).tokenizer.name == str(own / "tokenizer.json")
    # a toy vocabulary never gets V3 ids
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "config.json").write_text(json.dumps({"vocab_size": 256}))
    assert resolve_tokenizer(None, toy) is None


def test_convert_gives_the_folder_its_tokenizer(tok, bare_ckpt, tmp_path, monkeypatch):
    from dsv3.cli import main as cli_main

    monkeypatch.delenv("DSV3_TOKENIZER", raising=False)
    dst = tmp_path / "converted"
    assert cli_main(["convert", str(bare_ckpt), str(dst)]) == 0
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (dst / "tokenizer.json").is_file() and "<｜User｜>" in cfg["chat_template"]
