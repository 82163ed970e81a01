"""DeepSeek-V3.2 sparse attention trained by the shipped trainer, in the V3.2 report's two indexer
stages: one process and every layout family (dp2 x pp2; tp2 with and without sequence parallel; tp2 x
ep2; dp2 x tp2, FSDP over dp: 2 or 4 CPU processes, gloo) log the same losses within 1e-5 over 20
steps, training and evaluation. Under tp the indexer is replicated and its KL target (the attention
summed over all heads) is all-reduced over the tp ranks (`dsv3.parallel.tp.indexer_plan`). The dense
warm-up changes only the indexers (and lowers their KL loss); in the sparse stage the language-model
loss and the indexer loss train disjoint weights.

The tiny model has index_topk 8 on 32-token sequences (sparsity bites) and a wide init (std 0.1),
so attention is far from uniform and the indexer has something to learn."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.config.load import dump_yaml
from parallel_harness import losses, make_model, multi_run, run_cfg, tiny_cfg, valid_losses, write_dataset

TOL = 1e-5
STEPS = 20
DSA = dict(index_topk=8, index_n_heads=4, index_head_dim=16, initializer_range=0.1)
STAGES = ("dense_warmup", "sparse")
REF = {"data_parallel": 2, "micro_batch_num": 2}  # global batch 4, one process accumulates
TP = {"model_parallel": 2, "micro_batch_num": 4}
LAYOUTS = {  # name: (processes, parallel); global batch 4 in each
    "dp2pp2": (4, {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}),
    "dp2xtp2": (4, {"data_parallel": 2, "model_parallel": 2, "micro_batch_num": 2}),
    "tp2-sp": (2, {**TP, "use_seq_parallel": True}),
    "tp2-nosp": (2, {**TP, "use_seq_parallel": False}),
    "tp2xep2": (2, {**TP, "expert_parallel": 2}),
}


def _cfg(prefix, out, parallel, stage):
    cfg = run_cfg(prefix, out, parallel, steps=STEPS, batch_size=1, save=False, eval_steps=STEPS, **DSA)
    cfg.train.indexer_stage = stage
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    from dsv3.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("dsa")
    prefix = write_dataset(tmp)
    trained = {}
    for stage in STAGES:
        t = Trainer(_cfg(prefix, tmp / f"ref-{stage}", REF, stage), quiet=True)
        t.fit()
        trained[stage] = {k: v.detach().clone() for k, v in t.strategy.parts[0].state_dict().items()}
        t.close()
    (tmp / "held").mkdir()
    # only the layouts whose tests were selected (the extended ones run with -m extended)
    wanted = {(it.callspec.params["name"], it.callspec.params["stage"]) for it in request.session.items
              if it.module is request.module and "name" in getattr(getattr(it, "callspec", None), "params", {})}
    for n in (2, 4):
        configs = []
        for name, stage in ((name, stage) for name, (procs, _) in LAYOUTS.items() if procs == n
                            for stage in STAGES if (name, stage) in wanted):
            configs.append(tmp / f"{name}-{stage}.yaml")
            dump_yaml(_cfg(prefix, tmp / f"{name}-{stage}", LAYOUTS[name][1], stage), configs[-1])
        if configs:
            multi_run(n, configs, tmp / "held")
    return tmp, trained


def _records(out):
    return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in s]


# the default run: each indexer stage once, one under pp and one under tp (sequence parallel); the other
# eight pairs (tp2 without SP, tp2 x ep2, dp2 x tp2 with FSDP, the other stages) run with -m extended
DEFAULT = {("dp2pp2", "dense_warmup"), ("tp2-sp", "sparse")}


@pytest.mark.slow
@pytest.mark.parametrize("name,stage", [pytest.param(n, s, marks=[] if (n, s) in DEFAULT else [pytest.mark.extended])
                                        for n in LAYOUTS for s in STAGES])
def test_layout_equals_one_process(runs, name, stage):
    tmp, _ = runs
    for r in range(LAYOUTS[name][0]):
        held = json.loads((tmp / "held" / f"{name}-{stage}.rank{r}.json").read_text())
        assert "error" not in held, held.get("trace")
    ref, got = _records(tmp / f"ref-{stage}"), _records(tmp / f"{name}-{stage}")
    assert len(ref) == len(got) == STEPS
    for key in ("loss", "lm_loss", "indexer_loss"):
        assert max(abs(a[key] - b[key]) for a, b in zip(ref, got)) <= TOL, key
    assert min(r["indexer_loss"] for r in ref) > 0.01  # the indexer loss is really there
    vref, vgot = valid_losses(tmp / f"ref-{stage}"), valid_losses(tmp / f"{name}-{stage}")
    assert sorted(vref) == sorted(vgot) == [0, STEPS]
    assert max(abs(vref[k] - vgot[k]) for k in vref) <= TOL


@pytest.mark.slow
def test_dense_warmup_trains_only_the_indexers(runs):
    tmp, trained = runs
    init = make_model(tiny_cfg(**DSA)).state_dict()
    after = trained["dense_warmup"]
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)[:5]
    assert len(changed) == len([k for k in init if ".indexer." in k])  # every indexer tensor learned
    recs = _records(tmp / "ref-dense_warmup")
    kl = [r["indexer_loss"] for r in recs]
    assert sum(kl[-5:]) < 0.8 * sum(kl[:5])  # the KL to the attention distribution falls
    assert all(r["loss"] == r["indexer_loss"] for r in recs)  # the objective is the indexer loss alone
    v = valid_losses(tmp / "ref-dense_warmup")
    assert v[0] == v[STEPS]  # the model itself (dense attention) did not move
    sparse = valid_losses(tmp / "ref-sparse")
    assert sparse[STEPS] < sparse[0] - 0.1  # the sparse stage trains the model


def test_sparse_stage_losses_train_disjoint_weights():
    """LM loss -> no indexer gradient (top-k is discrete, the indexer reads detached inputs);
    indexer KL -> gradients on the indexers only."""
    from dsv3.model.mla import set_indexer_stage
    from dsv3.train.loss import compute_loss

    model = make_model(tiny_cfg(**DSA)).train()
    assert set_indexer_stage(model, "sparse") == 5  # 4 layers + the MTP block
    toks = torch.randint(0, 256, (2, 32))
    batch = {"tokens": toks, "labels": toks.roll(-1, 1), "loss_mask": torch.ones(2, 32)}
    for which in ("main", "indexer"):
        model.zero_grad(set_to_none=True)
        total, _ = compute_loss(model, batch, 0.3)
        idx = model.indexer_loss()
        (idx if which == "indexer" else total - idx).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        on_indexer = {n for n in with_grad if ".indexer." in n}
        if which == "indexer":  # wq_b, wk, k_norm weight and bias, weights_proj in each of 5 layers
            assert with_grad == on_indexer and len(on_indexer) == 5 * 5
        else:
            assert len(with_grad) > 50 and not on_indexer
