"""The public surface: `import dsv3` is light; from_pretrained / ModelConfig / lazy LLM, SamplingParams."""

from __future__ import annotations

import subprocess
import sys

import torch

import dsv3
from hf_oracle import make_hf_checkpoint


def test_import_is_light_and_lazy():
    code = "import sys, dsv3; assert 'torch' not in sys.modules; dsv3.ModelConfig(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    code = "import sys, dsv3; dsv3.SamplingParams; assert 'dsv3.infer' in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_from_pretrained_contract(tmp_path):
    hf = make_hf_checkpoint(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype="float32")
    assert isinstance(model.config, dsv3.ModelConfig) and not model.training
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 9, hf.config.vocab_size) and logits.dtype == torch.float32
    assert model.save_pretrained(tmp_path / "again") == tmp_path / "again"
    assert type(model).from_pretrained(tmp_path / "again", dtype=torch.float32) is not None
