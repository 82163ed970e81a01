"""Benchmark prompt sets, as in vLLM's `benchmark_dataset.py`: random, sonnet-like, custom JSONL.

Every sample carries the prompt text, its token count under the benchmark tokenizer (no BOS:
`add_special_tokens=False`, like vLLM's `prompt_len`) and the requested output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dsv3.errors import UserError


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int


# First BPE id used for random prompts: the lowest ids of the DeepSeek-V3 vocabulary are special
# tokens (bos 0, eos 1, ...) that would end or restart a prompt.
_FIRST_PLAIN_ID = 100


def _lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    lo, hi = max(int(mean * (1 - ratio)), 1), max(int(mean * (1 + ratio)), 1)
    return [rng.randint(lo, hi) for _ in range(n)]


def random_dataset(tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   prefix_len: int = 0, seed: int = 0) -> list[SampleRequest]:
    """Prompts of random BPE tokens with exactly the sampled token length.

    Decoding random ids and re-encoding does not round-trip, so (like newer vLLM) we re-encode,
    cut or pad to the target length, and decode again until the length is exact."""
    if not 0.0 <= range_ratio < 1.0:
        raise UserError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    hi = min(tokenizer.vocab_size, 128000)  # plain BPE ids only (no added special tokens)
    prefix = [rng.randrange(_FIRST_PLAIN_ID, hi) for _ in range(prefix_len)]
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    out = []
    for n_in, n_out in zip(in_lens, out_lens):
        target = prefix_len + n_in
        ids = prefix + [rng.randrange(_FIRST_PLAIN_ID, hi) for _ in range(n_in)]
        text = tokenizer.decode(ids)
        for _ in range(10):
            ids = tokenizer.encode(text)
            if len(ids) == target:
                break
            if len(ids) > target:
                ids = ids[:target]
            else:
                ids = ids + [rng.randrange(_FIRST_PLAIN_ID, hi) for _ in range(target - len(ids))]
            text = tokenizer.decode(ids)
        out.append(SampleRequest(text, len(tokenizer.encode(text)), n_out))
    return out


# Public-domain poem lines (Shakespeare, Sonnets 18, 29, 116, 130) for the sonnet-like dataset.
SONNET_LINES = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featured like him, like him with friends possess'd,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remember'd such wealth brings
That then I scorn to change my state with kings.
Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.
My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damask'd, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks.
I love to hear her speak, yet well I know
That music hath a far more pleasing sound;
I grant I never saw a goddess go;
My mistress, when she walks, treads on the ground:
And yet, by heaven, I think my love as rare
As any she belied with false compare.
""".splitlines(keepends=True)

SONNET_BASE_PROMPT = "Pick as many lines as you can from these poem lines:\n"


def sonnet_dataset(tokenizer, num_prompts: int, input_len: int = 550, output_len: int = 150,
                   prefix_len: int = 200, seed: int = 0, lines: list[str] | None = None) -> list[SampleRequest]:
    """vLLM's sonnet dataset: a fixed instruction, a shared prefix of poem lines, then random lines,
    sized in whole lines to about `input_len` tokens of the chat-formatted prompt."""
    lines = lines or SONNET_LINES
    rng = random.Random(seed)

    def chat_len(text: str) -> int:
        return len(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True))

    avg_line = sum(len(tokenizer.encode(line)) for line in lines) / len(lines)
    base = chat_len(SONNET_BASE_PROMPT)
    if input_len <= base:
        raise UserError(f"--sonnet-input-len {input_len} must exceed the base prompt's {base} tokens")
    n_lines = round((input_len - base) / avg_line)
    n_prefix = max(round((prefix_len - base) / avg_line), 0)
    if n_prefix > n_lines:
        raise UserError(f"--sonnet-prefix-len {prefix_len} must not exceed --sonnet-input-len {input_len}")
    prefix = [lines[i % len(lines)] for i in range(n_prefix)]
    out = []
    for _ in range(num_prompts):
        body = prefix + rng.choices(lines, k=n_lines - n_prefix)
        prompt = SONNET_BASE_PROMPT + "".join(body)
        out.append(SampleRequest(prompt, chat_len(prompt), output_len))
    return out


def read_lines(path: str | Path) -> list[str]:
    """A text dataset file (vLLM's sonnet.txt): its non-empty lines, newline kept."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read dataset ({getattr(e, 'strerror', None) or e})") from None
    if not lines:
        raise UserError(f"{path}: no lines")
    return [ln if ln.endswith("\n") else ln + "\n" for ln in lines]


def custom_dataset(tokenizer, path: str | Path, num_prompts: int, output_len: int = 256,
                   seed: int = 0, shuffle: bool = False) -> list[SampleRequest]:
    """JSON lines `{"prompt": "...", "output_tokens": N}` (`output_tokens` optional; `max_tokens`
    is accepted too). The first `num_prompts` lines are used, cycling when the file is shorter."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read dataset ({e.strerror or e})") from None
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{no}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{no}: expected an object with a string 'prompt'")
        n_out = row.get("output_tokens", row.get("max_tokens", output_len))
        if not isinstance(n_out, int) or n_out < 1:
            raise UserError(f"{path}:{no}: 'output_tokens' must be a positive integer, got {n_out!r}")
        rows.append((row["prompt"], n_out))
    if not rows:
        raise UserError(f"{path}: no prompts")
    if shuffle:
        random.Random(seed).shuffle(rows)
    rows = [rows[i % len(rows)] for i in range(num_prompts)]
    return [SampleRequest(p, len(tokenizer.encode(p)), n) for p, n in rows]
