"""Session data for the training tests: WikiText-2's valid file preprocessed once (~10 s)."""

from __future__ import annotations

import pytest

from run_config import SAMPLE_LEN


@pytest.fixture(scope="session")
def wiki_prefix(tmp_path_factory, data_dir) -> str:
    """Prefix of WikiText-2 valid tokenised with the DeepSeek-V3 tokenizer (stitched at SAMPLE_LEN);
    `data_dir` (tests/conftest.py) skips when the shared data is absent."""
    from dsv3.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("wiki")
    res = preprocess(data_dir / "wikitext-2" / "wiki.valid.tokens", str(out / "wiki_valid"),
                     vocab_file=str(data_dir / "deepseek_v3_tokenizer" / "tokenizer.json.xz"),
                     seq_length=SAMPLE_LEN, workers=2, progress=False)
    return res.prefixes["text"]


@pytest.fixture(scope="session")
def reference(wiki_prefix, tmp_path_factory):
    """6 steps in one run (checkpoints at 3 and 6): per-step losses and the final states (read-only)."""
    from dsv3.train.trainer import Trainer
    from run_config import small_run, train_losses

    out = tmp_path_factory.mktemp("ref")
    t = Trainer(small_run(wiki_prefix, out), quiet=True)
    t.fit()
    return {"losses": train_losses(out), "model": {k: v.clone() for k, v in t.model.state_dict().items()},
            "optim": t.optimizer.state_dict(), "out": out}
