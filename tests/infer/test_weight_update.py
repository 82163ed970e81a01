"""`LLMEngine.update_weights` in one process: after an update from a state dict, dense and quantised
engines (requantised with their scheme, native packs rebuilt) give exactly the greedy tokens of an
engine built on the new weights; a wrong update changes nothing; pause modes at the engine level."""

from __future__ import annotations

import pytest
import torch

from infer_helpers import GREEDY, LLMEngine, engine_greedy, tiny_model
from dsv3.errors import UserError

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9] * 7]


def _engine(seed: int, quantization=None) -> LLMEngine:
    return LLMEngine(tiny_model(seed=seed), max_num_seqs=4, num_gpu_blocks=64, quantization=quantization)


@pytest.mark.parametrize("quantization", [None, "int4", pytest.param("int8", marks=pytest.mark.extended)])
def test_update_equals_fresh_engine(quantization):
    served, fresh = _engine(0, quantization), _engine(1, quantization)
    before = engine_greedy(served, PROMPTS, 8)
    want = engine_greedy(fresh, PROMPTS, 8)
    assert before != want
    new = {k: v.clone() for k, v in tiny_model(seed=1).state_dict().items()}
    assert served.update_weights(new) == "1" and served.weight_version == "1"
    assert engine_greedy(served, PROMPTS, 8) == want
    # a wrong shape anywhere refuses the whole update: the old weights keep serving, the version stays
    bad = {k: v * 0 for k, v in new.items()}
    bad["model.layers.1.mlp.experts.down_proj"] = torch.zeros(2, 2)
    with pytest.raises(UserError, match=r"down_proj \[2, 2\]"):
        served.update_weights(bad, "2")
    with pytest.raises(UserError, match="not in the served model: model.nope"):
        served.update_weights({"model.nope": torch.zeros(1)})
    # the second run of each engine reads its prompts' prefix from the cache (fewer prefill rows, so the
    # quantised engines' decode-sized kernels, whose activations are Q8: compare like with like)
    assert engine_greedy(served, PROMPTS, 8) == engine_greedy(fresh, PROMPTS, 8) and served.weight_version == "1"


def test_update_mid_request_and_pause_modes():
    """An update between steps recomputes the running sequence with the new weights (its output then
    carries the new version); "keep" freezes, "wait" finishes the running and admits none, "abort" ends all."""
    served = _engine(0)
    new = {k: v.clone() for k, v in tiny_model(seed=1).state_dict().items()}
    served.add_request("r", None, PROMPTS[0], GREEDY(6))
    outs = served.step() + served.step()  # prefill + one decode: two tokens from the old weights
    first = outs[-1].outputs[0].token_ids
    assert len(first) == 2 and outs[-1].weight_version == "0"
    served.pause_generation("keep")
    assert served.step() == [] and served.generation_idle()
    served.update_weights(new, "v1")
    served.continue_generation()
    done = []
    while served.has_unfinished_requests():
        done += served.step()
    assert done[-1].finished and done[-1].weight_version == "v1"
    rest = engine_greedy(_engine(1), [PROMPTS[0] + first], 4)[0]
    assert done[-1].outputs[0].token_ids == first + rest
    # wait: the running one goes on, a new one waits until continue
    served.add_request("w1", None, PROMPTS[0], GREEDY(3))
    served.step()
    served.pause_generation("wait")
    served.add_request("w2", None, PROMPTS[1], GREEDY(3))
    finished = {}
    for _ in range(10):
        finished.update({o.request_id: o for o in served.step() if o.finished})
    assert set(finished) == {"w1"} and served.generation_idle()
    served.continue_generation()
    while served.has_unfinished_requests():
        finished.update({o.request_id: o for o in served.step() if o.finished})
    assert finished["w2"].outputs[0].finish_reason == "length"
    # abort: everything ends with "abort"
    served.add_request("a1", None, PROMPTS[0], GREEDY(5))
    served.step()
    served.pause_generation("abort")
    outs = served.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] and not served.has_unfinished_requests()
    served.continue_generation()
