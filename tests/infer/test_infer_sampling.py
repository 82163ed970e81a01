"""Sampler statistics (fixed seeds), penalties, seeds, stops, n > 1 and min/max tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from infer_helpers import LLMEngine, SamplingParams, tiny_model

from dsv3.infer.sampling import SamplingBatch, apply_penalties, make_batch, sample, token_counts

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
N = 40_000


def _draw(sp: SamplingParams, seed: int = 0) -> torch.Tensor:
    """N draws from LOGITS under `sp` (rows share the global RNG, seeded) -> empirical distribution [V]."""
    torch.manual_seed(seed)
    batch = make_batch([sp] * N, [None] * N, LOGITS.numel(), torch.device("cpu"))
    ids = sample(LOGITS.expand(N, -1).clone(), batch)
    return torch.bincount(ids, minlength=LOGITS.numel()).float() / N


def _close(emp: torch.Tensor, want: torch.Tensor) -> None:
    # 40k draws: binomial std <= 0.0025, so 0.012 is ~5 sigma
    assert (emp - want).abs().max() < 0.012, (emp, want)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_temperature_distribution(t):
    _close(_draw(SamplingParams(temperature=t)), (LOGITS / t).softmax(-1))


def test_top_k_distribution():
    emp = _draw(SamplingParams(temperature=1.0, top_k=3))
    want = torch.zeros_like(LOGITS)
    want[:3] = LOGITS[:3].softmax(-1)
    assert emp[3:].sum() == 0
    _close(emp, want)


def test_top_p_distribution():
    p = LOGITS.softmax(-1)  # 0.40, 0.25, 0.15, 0.09, ...: top_p 0.7 keeps the first 3 (0.40+0.25 < 0.7 <= +0.15)
    emp = _draw(SamplingParams(temperature=1.0, top_p=0.7))
    want = torch.zeros_like(p)
    want[:3] = p[:3] / p[:3].sum()
    assert emp[3:].sum() == 0
    _close(emp, want)


def test_min_p_distribution():
    p = LOGITS.softmax(-1)
    keep = p >= 0.3 * p.max()
    emp = _draw(SamplingParams(temperature=1.0, min_p=0.3))
    assert emp[~keep].sum() == 0
    _close(emp, torch.where(keep, p, 0) / p[keep].sum())


def test_greedy_rows_mixed_with_sampled_rows():
    sps = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0)] * 200
    ids = sample(LOGITS.expand(len(sps), -1).clone(), make_batch(sps, [None] * len(sps), 8, torch.device("cpu")))
    assert (ids[0::2] == 0).all() and (ids[1::2] != 0).any()


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    sp = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    b = make_batch([sp], [None], 4, torch.device("cpu"))
    b.repetition, b.presence, b.frequency = torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25])
    prompt = token_counts([[0]], 4, torch.device("cpu"))  # token 0 in the prompt
    output = token_counts([[1, 1, 2]], 4, torch.device("cpu"))  # token 1 twice, 2 once in the output
    got = apply_penalties(logits, b, prompt, output)
    want = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 - 0.5, 0.5 / 2 - 0.25 - 0.5, 1.0]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kw, word", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(n=0), "n"), (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(repetition_penalty=0.0), "repetition"),
    (dict(presence_penalty=3.0), "presence"), (dict(stop=[""]), "stop"), (dict(logprobs=-1), "logprobs"),
])
def test_validate_messages(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kw).validate(1000)


# ---- through the engine ---------------------------------------------------------------------------
class CharTokenizer:
    """Token i <-> one letter (a..z cycling); id 1 is eos and special. Enough to test stop strings."""

    eos_id = 1

    def encode(self, text, add_bos=False):
        return ([0] if add_bos else []) + [2 + (ord(c) - 97) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i in (0, 1) and skip_special_tokens else chr(97 + (i - 2) % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_model(64)


def _run(eng, reqs: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (ids, sp) in reqs.items():
        eng.add_request(rid, None, ids, sp)
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            out[o.request_id] = o
    return out


def test_seeded_sampling_reproducible_and_batch_independent(model):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    prompt = list(range(3, 11))
    a = _run(LLMEngine(model, None, num_gpu_blocks=32, block_size=4), {"x": (prompt, sp)})["x"].outputs[0].token_ids
    others = {f"o{i}": (list(range(5, 9 + i)), SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True)) for i in range(3)}
    b = _run(LLMEngine(model, None, num_gpu_blocks=64, block_size=4), {**others, "x": (prompt, sp)})["x"].outputs[0].token_ids
    c = _run(LLMEngine(model, None, num_gpu_blocks=32, block_size=4),
             {"x": (prompt, dataclasses.replace(sp, seed=8))})["x"].outputs[0].token_ids
    assert a == b and a != c


def test_n_completions(model):
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=1, ignore_eos=True)
    out = _run(LLMEngine(model, None, num_gpu_blocks=32, block_size=4), {"x": (list(range(3, 9)), sp)})["x"]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_strings_ids_eos_min_tokens(model):
    tok = CharTokenizer()
    eng = LLMEngine(model, tok, num_gpu_blocks=64, block_size=4)
    prompt = list(range(3, 9))
    base = _run(eng, {"b": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))})["b"].outputs[0]
    assert base.text == tok.decode(base.token_ids) and len(base.token_ids) == 20
    # stop string = two characters from the middle of the greedy text
    stop = base.text[8:10]
    cut = base.text.find(stop)
    out = _run(eng, {"s": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]))})["s"].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (base.text[:cut], "stop", stop)
    inc = _run(eng, {"i": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True))})["i"].outputs[0]
    assert inc.text == base.text[: cut + len(stop)]
    # stop token id: the 5th generated token; it ends the output and is its last id
    sid = base.token_ids[4]
    first = base.token_ids.index(sid)
    out = _run(eng, {"t": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[sid]))})["t"].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and (out.finish_reason, out.stop_reason) == ("stop", sid)
    assert out.text == base.text[:first]
    # min_tokens: the stop id is masked until 12 tokens exist, so the output is longer
    out = _run(eng, {"m": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[sid],
                                                   min_tokens=12))})["m"].outputs[0]
    assert len(out.token_ids) >= 12 and sid not in out.token_ids[:12]


def test_streamed_text_never_shrinks_with_stop_strings(model):
    tok = CharTokenizer()
    eng = LLMEngine(model, tok, num_gpu_blocks=64, block_size=4)
    eng.add_request("s", None, list(range(3, 9)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=["zzz", "qq"]))
    texts = []
    while eng.has_unfinished_requests():
        texts += [o.outputs[0].text for o in eng.step()]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_eos_stops_unless_ignored(model):
    prompt = list(range(3, 9))
    eng = LLMEngine(model, None, num_gpu_blocks=64, block_size=4)
    base = _run(eng, {"b": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))})["b"].outputs[0]
    # make the model's own 3rd greedy token the "eos" of a copy of the config
    eng.eos_ids = {base.token_ids[2]}
    out = _run(eng, {"e": (prompt, SamplingParams(temperature=0.0, max_tokens=20))})["e"].outputs[0]
    k = base.token_ids.index(base.token_ids[2])
    assert out.token_ids == base.token_ids[: k + 1] and out.finish_reason == "stop" and out.stop_reason is None


def test_make_batch_skips_unused_transforms():
    b: SamplingBatch = make_batch([SamplingParams(temperature=0.7)], [None], 8, torch.device("cpu"))
    assert b.top_k is None and b.top_p is None and b.min_p is None and not b.all_greedy
