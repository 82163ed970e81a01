"""HF -> dsv3 -> HF is bit-exact; transformers reads what we write; shards are really streamed."""

from __future__ import annotations

import json

import pytest
import torch

import dsv3
from dsv3.checkpoint.reader import CheckpointReader
from dsv3.checkpoint.save import parse_size
from hf_oracle import add_mtp_layer, make_hf_checkpoint


def _all_tensors(path):
    r = CheckpointReader(path)
    return {n: r.tensor(n) for n in r.names()}


@pytest.mark.parametrize("overrides", [dict(), dict(n_shared_experts=0, q_lora_rank=None, first_k_dense_replace=0)])
def test_hf_dsv3_hf_round_trip_is_bit_exact(tmp_path, overrides):
    src, dst = tmp_path / "hf", tmp_path / "back"
    hf = make_hf_checkpoint(src, **overrides)
    add_mtp_layer(src, hf)
    model = dsv3.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(dst, max_shard_size="30KB")
    a, b = _all_tensors(src), _all_tensors(dst)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert b["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not list(tmp_path.glob(".back.tmp-*"))  # temporary directory renamed away


def test_bf16_load_keeps_router_bias_fp32_and_round_trips(tmp_path):
    src = tmp_path / "hf"
    make_hf_checkpoint(src)
    model = dsv3.from_pretrained(src, dtype="bfloat16")
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    ref = _all_tensors(src)["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(bias, ref)  # not rounded through bf16
    model.save_pretrained(tmp_path / "bf16")
    saved = _all_tensors(tmp_path / "bf16")
    assert saved["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert saved["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "model.safetensors").is_file()  # one shard: no index, like transformers


def test_transformers_loads_our_save(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    hf = make_hf_checkpoint(tmp_path / "hf")
    model = dsv3.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ours", max_shard_size="100KB")
    again = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 50))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


def test_save_into_existing_directory_keeps_other_files(tmp_path):
    make_hf_checkpoint(tmp_path / "hf")
    model = dsv3.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    model.save_pretrained(out, max_shard_size="30KB")
    n_big = len(list(out.glob("model-*.safetensors")))
    model.save_pretrained(out, max_shard_size="10MB")  # fewer shards now: stale ones removed
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert n_big > 1 and not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert dsv3.from_pretrained(out, dtype=torch.float32) is not None


def test_fused_v5_expert_names_are_accepted(tmp_path):
    """transformers' in-memory layout (gate_up_proj [E,2I,D], down_proj [E,D,I]) loads the same model."""
    from safetensors.torch import save_file

    hf = make_hf_checkpoint(tmp_path / "hf")
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    a = dsv3.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    b = dsv3.from_pretrained(fused, dtype=torch.float32)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_loads_on_meta_then_assigns(tmp_path, monkeypatch):
    """No tensor is allocated twice: every parameter the loader hands over is the one the model keeps."""
    import dsv3.checkpoint.load as load

    make_hf_checkpoint(tmp_path)
    assigned = {}
    real = load._assign

    def spy(model, name, t):
        assigned[name] = t.data_ptr()
        real(model, name, t)

    monkeypatch.setattr(load, "_assign", spy)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert t.device.type == "cpu"
        if name in assigned:
            assert t.data_ptr() == assigned[name], name
    assert set(assigned) == set(model.state_dict())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234


def test_mtp_loading_choices(tmp_path):
    from dsv3.checkpoint.convert import convert
    from dsv3.errors import UserError

    hf = make_hf_checkpoint(tmp_path / "hf")  # transformers writes num_nextn_predict_layers=0 here (BASE)
    with pytest.raises(UserError, match="mtp=True"):
        dsv3.from_pretrained(tmp_path / "hf", mtp=True)
    add_mtp_layer(tmp_path / "hf", hf)
    convert(tmp_path / "hf", tmp_path / "ours", to="dsv3")
    for d in ("hf", "ours"):
        assert dsv3.from_pretrained(tmp_path / d, dtype=torch.float32, mtp=True).config.num_nextn_predict_layers == 1
        plain = dsv3.from_pretrained(tmp_path / d, dtype=torch.float32, mtp=False)
        assert len(plain.model.mtp) == 0 and not any(k.startswith("model.mtp") for k in plain.state_dict())
    # transformers' own files declare an MTP layer they do not contain: loaded without it, with a warning
    make_hf_checkpoint(tmp_path / "declared", num_nextn_predict_layers=1)
    with pytest.warns(UserWarning, match="no MTP weights"):
        assert dsv3.from_pretrained(tmp_path / "declared").config.num_nextn_predict_layers == 0


def test_convert_cli_says_what_it_converted(good, tmp_path):
    """`dsv3 convert` prints tensors by dtype read and written, shards, bytes and time (it printed only
    "wrote DIR"); every figure equals what the output files hold."""
    import re
    import subprocess
    import sys
    from collections import Counter

    from safetensors import safe_open

    dst = tmp_path / "bf16"
    r = subprocess.run([sys.executable, "-m", "dsv3", "convert", str(good), str(dst), "--dtype", "bfloat16",
                        "--max-shard-size", "60KB"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shards = sorted(dst.glob("*.safetensors"))
    written, nbytes = Counter(), 0
    for f in shards:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                written[str(t.dtype).removeprefix("torch.")] += 1
                nbytes += t.numel() * t.element_size()
    n_src = len(CheckpointReader(good).meta)
    out = r.stdout.strip()
    assert out.startswith(f"converted {good}: {n_src:,} tensors ("), out
    listed = ", ".join(f"{k} x {v:,}" for k, v in written.most_common())
    assert f" -> {dst} (hf): {sum(written.values()):,} tensors ({listed}), {len(shards)} shards, " in out, out
    biases = sum("e_score_correction_bias" in n for n in CheckpointReader(good).meta)
    assert written["bfloat16"] and written["float32"] == biases > 0  # the router biases stay fp32
    assert re.search(rf", {nbytes / 1e3:.3g} kB, in \d+\.\d s$", out), (out, nbytes)


def test_save_pretrained_writes_the_tokenizer(tiny_tok_ckpt, tmp_path):
    """`model.save_pretrained(dir)` ships the tokenizer, as `dsv3 train`'s export does: by default the
    one of the directory the model was loaded from; `tokenizer=` names another; None writes none."""
    from dsv3.data.tokenizer import load_tokenizer, resolve_tokenizer
    from dsv3.model.transformer import Transformer

    model = dsv3.from_pretrained(tiny_tok_ckpt, dtype="float32")
    model.save_pretrained(tmp_path / "auto")
    assert (tmp_path / "auto" / "tokenizer.json").read_bytes() == (tiny_tok_ckpt / "tokenizer.json").read_bytes()
    assert resolve_tokenizer(None, tmp_path / "auto").encode("hello world") == load_tokenizer(tiny_tok_ckpt).encode("hello world")

    fresh = Transformer(model.config)  # built in Python: nothing to copy unless told
    fresh.save_pretrained(tmp_path / "none-known")
    assert not list((tmp_path / "none-known").glob("tokenizer*"))
    fresh.save_pretrained(tmp_path / "given", tokenizer=tiny_tok_ckpt / "tokenizer.json")
    conf = json.loads((tmp_path / "given" / "tokenizer_config.json").read_text())
    assert (tmp_path / "given" / "tokenizer.json").is_file() and "chat_template" in conf
    model.save_pretrained(tmp_path / "off", tokenizer=None)
    assert not list((tmp_path / "off").glob("tokenizer*"))
