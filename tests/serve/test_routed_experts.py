"""`return_routed_experts` through `dsv3 serve` (real app over HTTP, the `openai` client and httpx): each
choice's routed experts per generated token and MoE layer, streamed and not, equal to what the
model's own router picks when the whole sequence is re-run by the trainer's model (routing replay
agreement 1.0 and the same logits as without replay), and the cap refused with one line."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from serve_helpers import API_KEY, MODEL_NAME

CAP = 200 * 3 * 2  # this module's server: 200 tokens of the tiny model's 3 MoE layers x top-2
PROMPT = "The quick brown fox"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):  # the conftest's server runs this engine (a small cap to test the refusal)
    from dsv3.infer.engine import LLMEngine

    return LLMEngine.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", max_num_seqs=8,
                                     max_routed_expert_ids=CAP)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from dsv3.infer.llm import LLM

    return LLM(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def trainer_model(tiny_model_dir):
    import dsv3

    return dsv3.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def check_against_trainer(model, prompt_ids: list[int], out_ids: list[int], routed: list) -> None:
    from dsv3.train.replay import RoutingReplay, replay_rows, router_choices

    n, P = len(out_ids), len(prompt_ids)
    assert torch.tensor(routed).shape == (n, 3, 2)
    flat = torch.tensor(routed)
    assert int(flat.min()) >= 0 and int(flat.max()) < 8
    assert (flat[..., 0] != flat[..., 1]).all()
    seq = prompt_ids + out_ids[:-1]  # the trainer's input: the positions that sampled each output token
    own = router_choices(model, torch.tensor([seq]))[0]
    assert own[P - 1 :].tolist() == routed  # the router re-run on the same tokens picks the same experts
    with torch.no_grad():
        plain = model(torch.tensor([seq]))
    replay = replay_rows(routed, P, len(seq), 3, 2)[None]
    with RoutingReplay(model, replay, torch.tensor([seq])) as r, torch.no_grad():
        replayed = model(torch.tensor([seq]))
    assert r.agreement() == [1.0, 1.0, 1.0]
    assert torch.equal(replayed, plain)


def generate(llm, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list]:
    """Greedy token ids and routed experts of one prompt through the Python `LLM` (SamplingParams / RequestOutput)."""
    from dsv3.infer.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, return_routed_experts=True)
    out = llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0]
    return list(out.token_ids), out.routed_experts


def test_completions_routed_experts_full_and_streamed(server, client, llm, trainer_model):
    prompt_ids = [0, 4250, 6354, 8641, 21089]
    body = dict(model=MODEL_NAME, prompt=prompt_ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**{**body, "extra_body": {"ignore_eos": True, "return_routed_experts": True}})
    routed = full.choices[0].model_dump()["routed_experts"]
    out_ids, direct = generate(llm, prompt_ids, 8)
    assert routed == direct and len(routed) == full.usage.completion_tokens == 8
    check_against_trainer(trainer_model, prompt_ids, out_ids, routed)

    streamed = []
    for chunk in client.completions.create(**{**body, "extra_body": {"ignore_eos": True, "return_routed_experts": True}},
                                           stream=True):
        streamed += (chunk.choices[0].model_dump().get("routed_experts") or []) if chunk.choices else []
    assert streamed == routed
    assert client.completions.create(**body).choices[0].model_dump()["routed_experts"] is None  # not asked: null


def test_chat_routed_experts_full_and_streamed(server, client, engine, llm, trainer_model):
    messages = [{"role": "user", "content": "Count to five."}]
    body = dict(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0, ignore_eos=True,
                return_routed_experts=True)
    r = httpx.post(server.url + "/chat/completions", headers=HEADERS, json=body, timeout=120)
    assert r.status_code == 200, r.text
    routed = r.json()["choices"][0]["routed_experts"]
    prompt_ids = list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    out_ids, direct = generate(llm, prompt_ids, 6)
    assert routed == direct and len(routed) == 6
    check_against_trainer(trainer_model, prompt_ids, out_ids, routed)

    with httpx.stream("POST", server.url + "/chat/completions", headers=HEADERS, json={**body, "stream": True},
                      timeout=120) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert sum((c["choices"][0].get("routed_experts") or [] for c in chunks if c["choices"]), []) == routed


def test_routed_experts_over_the_cap_is_one_line(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 101, "n": 2}
    r = httpx.post(server.url + "/completions", headers=HEADERS, timeout=60, json={**body, "return_routed_experts": True})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "return_routed_experts" in msg and "202 x 3 MoE layers x 2" in msg and "\n" not in msg, msg
    ok = httpx.post(server.url + "/completions", headers=HEADERS, timeout=60,
                    json={**body, "max_tokens": 2, "return_routed_experts": True})
    assert ok.status_code == 200, ok.text  # within the cap: served
    assert [len(c["routed_experts"]) for c in ok.json()["choices"]] == [2, 2]


def test_routes_whatever_the_engine_path(tiny_model_dir, trainer_model):
    """MTP speculative decoding (verify steps of two positions per row), a prompt prefilled in chunks, and
    requests batched with others: each sampled token's routes are those the trainer's model picks."""
    from dsv3.infer.llm import LLM
    from dsv3.infer.sampling import SamplingParams

    prompts = [list(range(100, 140)), [0, 7, 8, 9], [0, 7, 8, 9, 10, 11]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, return_routed_experts=True)
    llm = LLM(tiny_model_dir, dtype="float32", device="cpu", speculative=True, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        co = out.outputs[0]
        check_against_trainer(trainer_model, prompt, list(co.token_ids), co.routed_experts)
    assert sum(o.metrics.spec_num_draft_tokens for o in outs) > 0  # verify steps ran
