"""`LLM(path, tensor_parallel_size=2)` used as users write it (CPU, gloo, tiny random models), each in a
fresh interpreter: a plain top-level script without a main guard, `python -c`, two and three engines
one after another in one process (`del`, `shutdown()`, a `with` block), and a vocabulary that 2 does
not divide (padded as vLLM pads: greedy tokens and logprobs equal one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))
sys.path.insert(0, str(REPO / "tests" / "model"))
from serve_helpers import write_tiny_model  # noqa: E402

MARK = "user script started"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_tp_llm"))


@pytest.fixture(scope="module")
def odd_vocab_dir(tmp_path_factory) -> Path:
    """The tiny preset at vocabulary 515 (odd: tensor parallel 2 pads it to 516), no tokenizer."""
    from hf_oracle import randomize_

    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    path = tmp_path_factory.mktemp("tiny_v515")
    cfg = load_model_config(REPO / "configs" / "tiny.yaml", ["model.vocab_size=515", "model.max_position_embeddings=512"])
    model = Transformer(cfg)
    randomize_(model, std=0.08, seed=0)
    model.save_pretrained(path)
    return path


def _python(args: list[str], cwd: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _result(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bootstrapping phase" not in r.stderr
    assert r.stdout.count(MARK) == 1, r.stdout  # the workers did not run the user's code again
    return json.loads(r.stdout.strip().splitlines()[-1])


SCRIPT = """\
import json
from dsv3 import LLM, SamplingParams

print("{mark}", flush=True)
sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
prompts = [[5, 6, 7, 8], [100, 2000, 30000]]
ids = lambda outs: [o.outputs[0].token_ids for o in outs]
one = ids(LLM("{model}", device="cpu", dtype="float32").generate(prompts, sp))
llm = LLM("{model}", tensor_parallel_size=2, device="cpu", dtype="float32")
first = ids(llm.generate(prompts, sp))
del llm  # the workers stop and the process group is freed: a second engine can start
llm = LLM("{model}", tensor_parallel_size=2, device="cpu", dtype="float32")
second = ids(llm.generate(prompts, sp))
llm.shutdown()
with LLM("{model}", tensor_parallel_size=2, device="cpu", dtype="float32") as llm:
    third = ids(llm.generate(prompts, sp))
print(json.dumps({{"one": one, "tp": [first, second, third]}}))
"""


def test_top_level_script_without_main_guard_three_engines_in_turn(model_dir, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(SCRIPT.format(mark=MARK, model=model_dir))
    res = _result(_python([str(script)], tmp_path))
    assert all(len(t) == 8 for t in res["one"])
    assert res["tp"] == [res["one"]] * 3


ODD = """\
import json
from dsv3 import LLM, SamplingParams
print("{mark}", flush=True)
sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
prompts = [[5, 6, 7], [514, 3, 2, 1, 513]]
def run(llm):
    return [(o.outputs[0].token_ids, [{{str(t): l.logprob for t, l in d.items()}} for d in o.outputs[0].logprobs])
            for o in llm.generate(prompts, sp)]
one = run(LLM("{model}", device="cpu", dtype="float32"))
with LLM("{model}", tensor_parallel_size=2, device="cpu", dtype="float32") as llm:
    two = run(llm)
    threads = [r["threads"] for r in llm.engine.runner.ping()]
print(json.dumps({{"one": one, "two": two, "threads": threads}}))
"""


def test_python_c_with_a_vocabulary_tp_does_not_divide(odd_vocab_dir, tmp_path):
    res = _result(_python(["-c", ODD.format(mark=MARK, model=odd_vocab_dir)], tmp_path, DSV3_NUM_THREADS="2"))
    assert res["threads"] == [2, 2]  # $DSV3_NUM_THREADS applies to every rank
    for (ids1, lp1), (ids2, lp2) in zip(res["one"], res["two"]):
        assert ids1 == ids2 and len(ids1) == 6
        for a, b in zip(lp1, lp2):  # the same top-5 tokens, logprobs (log-softmax over 515 logits) close
            assert a.keys() == b.keys() and all(int(t) < 515 for t in b)
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a), (a, b)


def test_padded_vocab_shards_in_memory_and_from_files_agree(odd_vocab_dir):
    """Rank 1 of 2 holds rows 258..514 and one zero row, whether cut in memory or read from the files."""
    import torch

    import dsv3
    from dsv3.infer.parallel import ParallelContext, shard_model
    from dsv3.infer.parallel_load import load_sharded

    full = dsv3.from_pretrained(odd_vocab_dir, dtype="float32")
    head, emb = full.lm_head.weight.detach().clone(), full.model.embed_tokens.weight.detach().clone()
    ctx = ParallelContext(None, tp_size=2, rank=1, world=2)
    cut = shard_model(full, ctx)
    read = load_sharded(odd_vocab_dir, ParallelContext(None, tp_size=2, rank=1, world=2), "float32")
    for m in (cut, read):
        for w, ref in ((m.lm_head.weight, head), (m.model.embed_tokens.weight, emb)):
            assert w.shape[0] == 258 and torch.equal(w[:257], ref[258:]) and not w[257].any()
        assert m.model.embed_tokens.num_embeddings == 258 and m.lm_head.out_features == 258
