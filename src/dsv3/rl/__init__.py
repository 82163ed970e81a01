"""Reinforcement learning on dsv3's own engine: the GRPO recipe (`dsv3 train --config configs/grpo_tiny.yaml`).

* `config`: the run YAML's sections (the pretraining ones that apply, plus `grpo:`), loaded strictly;
* `task`: the verifiable task (addition prompts drawn on the fly, the answer checked exactly);
* `grpo`: group-relative advantages, the clipped policy loss, the k3 KL estimator, sampler/trainer mismatch;
* `loop`: the run (rollouts from an in-process `LLM`, the update, weight sync, metrics, checkpoints, plots).
"""
