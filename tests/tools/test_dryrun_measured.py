"""`dsv3 dryrun`'s per-rank peak against the measured peak of a real `dsv3 train` run on CPU (gloo):
`dsv3 train --report-memory DIR` charges every tensor by its storage's lifetime (torch has no CPU
allocator statistics) and records each rank's peak, and its peak RSS.

The grid (`memory_cases.CASES`): one process, dp, pp, dp x pp x ep, tp 2, the 129k vocabulary with MTP,
recompute on and off, up to dp2 x tp2 x pp2 x ep2 on 8 ranks. Each case carries its measured peaks,
recorded with `memory_cases.MEASURED_WITH`:
* every case: the dry-run against the recorded peaks (no training: seconds);
* the cheap cases (`CI`) train again: the fresh peaks must equal the recorded ones (within 3%: MoE
  routing moves a little) and the dry-run must hold against them too; `-m extended` re-measures all.

Tolerance: within +-10% of every rank's peak (the issue's acceptance), though the MoE all-to-all
buffers are planned at `--imbalance 1.5` the mean load and these runs route near the mean. The errors
of every case are printed (pytest -s); docs/distributed.md has the table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from memory_cases import CASES, case_cfg, write_data

UNDER, OVER = 0.10, 0.10
CI = ("1proc", "tp2")  # re-measured fresh in the default run; every case is checked against its recorded peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("memdata") / "mem_text_document"))


def predict(name: str, data: str, out: str) -> tuple[object, dict]:
    from dsv3.tools.dryrun import report

    c = CASES[name]
    cfg = case_cfg(data, out, c.parallel, c.recompute, **c.keywords)
    return cfg, report(cfg, 2**40, gpu_attention=False)  # the CPU's attention kernels, as measured here


def measure(tmp, name: str, cfg) -> dict[int, dict]:
    from dsv3.config.load import dump_yaml

    n = CASES[name].processes
    dump_yaml(cfg, tmp / "cfg.yaml")
    train = ["-m", "dsv3", "train", "--config", str(tmp / "cfg.yaml"), "--report-memory", str(tmp / "mem")]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r: json.loads((tmp / "mem" / f"memory-rank{r}.json").read_text()) for r in range(n)}


def check(name: str, rep: dict, measured: dict[int, int]) -> None:
    """Every rank's measured peak against the prediction for its pipeline rank."""
    from dsv3.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(CASES[name].parallel)
    by_stage = {r["pp_stage"]: r for r in rep["ranks"]}
    errors = {}
    for rank, got in measured.items():
        r = by_stage[rank // (dims.dp * dims.tp)]
        err = (r["peak_bytes"] - got) / got
        parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["breakdown"].items())
        print(f"{name} rank {rank}: predicted {r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_phase']}: {parts}), "
              f"measured {got / 2**20:.1f} MiB: {100 * err:+.1f}%")
        assert r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] < got, "model states alone stay below the peak"
        errors[rank] = err
    assert all(-UNDER <= e <= OVER for e in errors.values()), errors


@pytest.mark.parametrize("name", list(CASES))
def test_dryrun_within_tolerance_of_recorded_peaks(name, tmp_path):
    _, rep = predict(name, "/nonexistent/never_read_text_document", str(tmp_path / "run"))
    check(name, rep, CASES[name].measured)


@pytest.mark.parametrize("name", [pytest.param(c, marks=[] if c in CI else [pytest.mark.slow, pytest.mark.extended]) for c in CASES])
def test_dryrun_peak_matches_fresh_measurement(name, data, tmp_path):
    cfg, rep = predict(name, data, str(tmp_path / "run"))
    got = {r: m["peak_tensor_bytes"]["cpu"] for r, m in measure(tmp_path, name, cfg).items()}
    check(name, rep, got)
    recorded = CASES[name].measured
    drift = {r: (got[r] - recorded[r]) / recorded[r] for r in got}
    assert all(abs(d) <= 0.03 for d in drift.values()), f"the table's recorded peaks are stale: {drift}"


@pytest.mark.gpu
def test_dryrun_peak_matches_cuda_allocator(data, tmp_path):
    """One process on CUDA (fp32, the CPU cases' model): the prediction against torch.cuda.max_memory_allocated."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dsv3.config.load import dump_yaml
    from dsv3.tools.dryrun import report

    cfg = case_cfg(data, str(tmp_path / "run"), {}, "none")
    cfg.train.device = "cuda"
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    rep = report(cfg, 2**40)
    proc = subprocess.run([sys.executable, "-m", "dsv3", "train", "--config", str(tmp_path / "cfg.yaml"), "--report-memory",
                           str(tmp_path / "mem")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "mem" / "memory-rank0.json").read_text())["cuda_max_allocated_bytes"]
    err = (rep["ranks"][0]["peak_bytes"] - got) / got
    print(f"cuda 1proc: predicted {rep['ranks'][0]['peak_bytes'] / 2**20:.1f} MiB, max_memory_allocated {got / 2**20:.1f} MiB: {100 * err:+.1f}%")
    assert -UNDER <= err <= OVER
