"""`dsv3 convert RUN/checkpoint/step-N DST` on the DCP checkpoint a `dsv3 launch` run writes (issue 26
item 3): the HF directory it writes has the tokenizer with the chat template and the MTP layer, and
its logits equal the run's own end-of-run `hf/` export; a DCP directory with a shard missing is one line.
The issue's dp2 x pp2 x ep2 run (4 processes: stages, experts sharded over the dp ranks) runs by default;
the seed's 8-process dp2 x mp2 x pp2 x ep2 layout (TP shards too) is marked extended (`-m extended`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from dsv3.config.load import dump_yaml
from parallel_harness import launch, run_cfg, write_dataset

LAYOUTS = {
    "dp2xpp2xep2": ({"data_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2, "micro_batch_num": 2}, 4),
    "dp2xmp2xpp2xep2": ({"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2,
                         "micro_batch_num": 2}, 8),
}


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3", "convert", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=[pytest.param("dp2xpp2xep2"), pytest.param("dp2xmp2xpp2xep2", marks=[pytest.mark.slow, pytest.mark.extended])])
def run(request, tmp_path_factory):
    parallel, n = LAYOUTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = run_cfg(write_dataset(tmp), tmp / "out", parallel, steps=2, vocab_size=129280)  # the DeepSeek tokenizer's ids fit
    dump_yaml(cfg, tmp / "run.yaml")
    launch(tmp, tmp / "run.yaml", n)
    return tmp


def test_convert_dcp_step_equals_run_export(run):
    from dsv3.checkpoint.io import from_pretrained

    step = run / "out" / "checkpoint" / "step-2"
    assert (step / ".metadata").is_file() and not list(step.glob("*.safetensors"))
    dst = run / "converted"
    r = _convert(step, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "tokenizer.json").is_file()
    assert "chat_template" in json.loads((dst / "tokenizer_config.json").read_text())
    names = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"] if (
        dst / "model.safetensors.index.json").is_file() else None
    got, ref = from_pretrained(dst, dtype="float32"), from_pretrained(run / "out" / "hf", dtype="float32")
    assert got.config.num_nextn_predict_layers == 1 and len(got.model.mtp) == 1  # MTP kept
    assert names is None or any(n.startswith("model.layers.4.") for n in names)
    ids = torch.randint(0, got.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = got(ids), ref(ids)
    a, b = (x if torch.is_tensor(x) else x[0] for x in (a, b))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_dcp_missing_shard_is_one_line(run):
    src = run / "broken"
    shutil.copytree(run / "out" / "checkpoint" / "step-2", src)
    victim = sorted(src.glob("*.distcp"))[-1]
    victim.unlink()
    r = _convert(src, run / "never")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"DCP shard {victim.name} is missing" in err[0], err
    assert not (run / "never").exists()


def test_convert_never_unpickles_a_hostile_metadata(tmp_path):
    """A `step-N/` in the DCP layout whose `.metadata` pickle would run code: `dsv3 convert` reads it through
    the allow-list (`dsv3.parallel.dcp.read_metadata`), refuses it in one line, runs nothing, writes nothing."""
    from test_parallel_dcp import _hostile_dir

    marker = tmp_path / "PWNED"
    cfg = run_cfg(write_dataset(tmp_path), tmp_path / "out", {}, steps=1, save=False)
    src = tmp_path / "step-2"
    _hostile_dir(src, cfg, marker, dsv3_layout=True)
    r = _convert(src, tmp_path / "never")
    err = r.stderr.strip().splitlines()
    assert not marker.exists(), "the .metadata pickle ran code"
    assert r.returncode == 2 and len(err) == 1 and "refers to posix.system" in err[0], r.stderr
    assert not (tmp_path / "never").exists()
