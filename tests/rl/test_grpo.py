"""The GRPO recipe through `dsv3 train --config grpo_tiny` (the shipped preset, a few small steps): metrics,
the sampler/trainer logprob agreement, checkpoints and an exact resume; its loss pieces; bad configs."""

from __future__ import annotations

import shutil

import pytest
import torch

from dsv3.cli import main
from dsv3.train.metrics import read_metrics

SMALL = ["--set", "train.steps=6", "--set", "grpo.warmup_steps=2", "--set", "grpo.prompts_per_step=2",
         "--set", "grpo.group_size=4", "--set", "checkpoint.save_steps=4", "--set", "logging.log_interval=1",
         "--set", "checkpoint.export_hf=false", "--set", "grpo.kl_coef=0.01"]
TIMING = {"tokens_per_s", "rollout_s", "train_s", "sync_s"}


def _train(out, *extra: str) -> int:
    return main(["train", "--config", "grpo_tiny", "--output-dir", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """6 steps (2 warm-up, 4 GRPO of 2 prompts x 4 completions, KL on; checkpoints at 4 and 6), read-only for the tests."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert _train(out) == 0
    return out


def test_metrics_every_step(run):
    recs = read_metrics(run)
    assert [(r["kind"], r["step"]) for r in recs] == [("sft", 1), ("sft", 2)] + [("grpo", s) for s in range(3, 7)]
    for r in recs[2:]:
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["sampled_tokens"] > 0 and r["tokens_per_s"] > 0
        # batch-invariant engine + exact scoring, the engine's weights the policy's at every step: bit-equal
        # (a stale engine, e.g. one whose absorbed MLA weights were not rebuilt, differs by whole nats)
        assert r["logprob_mismatch_tokens"] == 0 and r["logprob_mismatch_max"] == 0.0, r
        assert r["ratio_max"] == 1.0 and r["clip_frac"] == 0.0  # fresh rollouts: the ratio is exactly 1
    assert recs[2]["kl"] == 0.0 and recs[-1]["kl"] > 0.0  # the reference is the policy as GRPO began
    assert (run / "reference.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["step-4", "step-6"]
    if (run / "plots").is_dir():  # matplotlib installed
        assert (run / "plots" / "reward.png").stat().st_size > 0


def test_batched_mode_replays_the_engine_routing(tmp_path):
    """batch_invariant off, routing replay on: the trainer's forward routes through the engine's experts (R3),
    its own router's agreement is recorded per MoE layer, the logprobs agree up to rounding."""
    out = tmp_path / "replay"
    assert _train(out, "--set", "train.steps=4", "--set", "grpo.batch_invariant=false", "--set", "grpo.routing_replay=true",
                  "--set", "checkpoint.save_steps=0", "--set", "checkpoint.save_at_end=false", "--set", "logging.plots=false") == 0
    recs = [r for r in read_metrics(out) if r["kind"] == "grpo"]
    assert len(recs) == 2
    for r in recs:
        assert len(r["routing_agreement"]) == 1 and 0.0 <= r["routing_agreement"][0] <= 1.0, r
        assert r["logprob_mismatch_max"] < 1e-4, r  # a stale engine differs by whole nats


def test_resume_repeats_the_same_steps(run, tmp_path):
    """From step 4's checkpoint, steps 5 and 6 again: the same rollouts, rewards, losses and final weights."""
    from safetensors.torch import load_file

    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoint" / "step-6")
    assert _train(again, "--resume") == 0
    first, second = read_metrics(run), read_metrics(again)
    assert [r["step"] for r in second] == list(range(1, 7))
    for a, b in zip(first[4:], second[4:]):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    wa, wb = (load_file(d / "checkpoint" / "step-6" / "model.safetensors") for d in (run, again))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_clipped_loss_and_group_advantages():
    from dsv3.rl.grpo import RolloutBatch, group_advantages, policy_loss

    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / 0.57735, atol=1e-4)
    assert torch.equal(adv[1], torch.zeros(4))  # a group of equal rewards teaches nothing
    # token 0: ratio e^0.5 > 1 + eps with a positive advantage -> clipped, no gradient; token 1: ratio 1 -> gradient
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    batch = RolloutBatch(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                         torch.zeros(1, 2), torch.tensor([1.0]), [[0, 0, 0]])
    loss, stats = policy_loss(logp, batch, clip_eps=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == -0.5 and stats["clip_frac"] == 0.5
    _, stats = policy_loss(logp.detach(), batch, 0.2, ref_logp=torch.tensor([[0.0, 0.0]]), kl_coef=0.1)
    assert stats["kl"] == pytest.approx((torch.exp(torch.tensor(-0.5)) + 0.5 - 1).item() / 2)


@pytest.mark.parametrize("setting,expect", [
    ("grpo.group_size=1", "grpo.group_size must be >= 2"),
    ("model.vocab_size=8", "model.vocab_size 8: the addition task needs 14 ids"),
    ("train.precision=bf16", "a GRPO run trains in fp32"),
    ("grpo.routing_replay=true", "grpo.routing_replay needs grpo.batch_invariant false"),
    ("grpo.rewardd=1", "unknown key 'grpo.rewardd'"),
])
def test_bad_config_is_one_line(setting, expect, tmp_path, capsys):
    assert _train(tmp_path / "bad", "--set", setting) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "bad").exists()
