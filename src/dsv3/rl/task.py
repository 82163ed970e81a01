"""The verifiable task of the GRPO recipe: addition prompts drawn on the fly, answers checked exactly.

A prompt is `<bos> a + b =` with a, b uniform in 0..max_operand; a completion earns reward 1 when it is
exactly the digits of a + b followed by end-of-sequence, else 0. The symbols `0`-`9`, `+`, `=` take the
first vocabulary ids that are neither the model's bos nor its eos, so no tokenizer is needed (the
engine runs on token ids) and a policy with a vocabulary of 16 learns it in minutes on a CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dsv3.errors import UserError

SYMBOLS = "0123456789+="


@dataclass
class Problem:
    prompt_ids: list[int]
    answer: int


class AdditionTask:
    """Prompts, rewards and the format-only warm-up samples, over one model's token ids."""

    def __init__(self, bos: int, eos: int, vocab_size: int, max_operand: int):
        ids = [i for i in range(vocab_size) if i not in (bos, eos)][: len(SYMBOLS)]
        self.bos, self.eos, self.max_operand = bos, eos, max_operand
        self.id_of = dict(zip(SYMBOLS, ids))
        self.symbol_of = {i: s for s, i in self.id_of.items()}

    @staticmethod
    def check_model(model, grpo) -> None:
        """One line when the model cannot hold the task: too few ids, or prompts + completions beyond its positions."""
        need = len(SYMBOLS) + len({model.bos_token_id, model.eos_token_id})
        if model.vocab_size < need:
            raise UserError(f"model.vocab_size {model.vocab_size}: the addition task needs {need} ids "
                            f"({len(SYMBOLS)} symbols {SYMBOLS!r} plus bos and eos)")
        longest = 2 + 2 * len(str(grpo.max_operand)) + grpo.max_new_tokens
        if longest > model.max_position_embeddings:
            raise UserError(f"grpo: prompts and completions reach {longest} tokens, beyond model.max_position_embeddings "
                            f"{model.max_position_embeddings}")

    def encode(self, text: str) -> list[int]:
        return [self.id_of[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.symbol_of.get(i, "<eos>" if i == self.eos else f"<{i}>") for i in ids)

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        out = []
        for _ in range(n):
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            out.append(Problem([self.bos] + self.encode(f"{a}+{b}="), a + b))
        return out

    def reward(self, problem: Problem, completion: list[int]) -> float:
        """1.0 for exactly the answer's digits then eos, else 0.0."""
        return 1.0 if completion == self.encode(str(problem.answer)) + [self.eos] else 0.0

    def format_batch(self, n: int, rng: random.Random) -> dict[str, torch.Tensor]:
        """Warm-up samples `<bos> a+b=c <eos>` with c uniform in 0..2*max_operand (not the sum): the format only.
        Returns right-padded tokens / labels / loss_mask (loss on the answer and eos)."""
        rows = []
        for p in self.sample(n, rng):
            answer = self.encode(str(rng.randint(0, 2 * self.max_operand))) + [self.eos]
            rows.append((p.prompt_ids + answer, len(p.prompt_ids)))
        width = max(len(r) for r, _ in rows) - 1
        tokens = torch.full((n, width), self.eos, dtype=torch.long)
        labels = torch.full((n, width), self.eos, dtype=torch.long)
        mask = torch.zeros(n, width)
        for i, (seq, n_prompt) in enumerate(rows):
            tokens[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            labels[i, : len(seq) - 1] = torch.tensor(seq[1:])
            mask[i, n_prompt - 1: len(seq) - 1] = 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": mask}
