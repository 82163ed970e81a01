"""Weights without a restart on the real `dsv3 serve` process: updates from an HF and a dsv3-layout
checkpoint directory and from a trainer over a gloo group serve exactly the new model's greedy output,
with requests in flight and none failed; pause abort / wait / keep; refused updates keep the old
weights; every weight-sync route needs the key."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from serve_helpers import API_KEY, REPO, free_port, write_tiny_model
from test_cli_and_bench import _wait_health

PROMPT = "The capital of France is"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
N_KEEP = 200  # tokens of the request frozen by "keep": enough that the pause lands before it ends


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory):
    """The served model (seed 0), an HF dir of another (seed 1), the served one in dsv3's layout (written
    by `dsv3 convert --to dsv3`) and a dir whose one tensor has the wrong shape."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("wsync")
    hf_b = write_tiny_model(root / "b", seed=1)
    subprocess.run([sys.executable, "-m", "dsv3", "convert", str(tiny_model_dir), str(root / "c"), "--to", "dsv3"],
                   check=True, capture_output=True, timeout=300)
    bad = root / "bad"
    bad.mkdir()
    shutil.copy(hf_b / "config.json", bad / "config.json")
    tensors = load_file(hf_b / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return {"a": tiny_model_dir, "b": hf_b, "c": root / "c", "bad": bad}


@pytest.fixture(scope="module")
def served(dirs):
    port = free_port()
    cmd = [sys.executable, "-m", "dsv3", "serve", "--model", str(dirs["a"]), "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--api-key", API_KEY, "--max-num-seqs", "8", "--max-model-len", "512",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_health(root, proc)
        yield root
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def expected(dirs):
    """Greedy text of PROMPT under a freshly loaded engine of `key`'s weights (a dir key or a model)."""
    from dsv3 import LLM, SamplingParams

    cache = {}

    def run(key, n: int = 12, prompt_ids: list[int] | None = None) -> str:
        if key not in cache:
            src = dirs[key] if isinstance(key, str) else key
            cache[key] = LLM(src, tokenizer=_tok(dirs["a"]), dtype="float32", device="cpu")
        llm = cache[key]
        prompt = {"prompt_token_ids": prompt_ids} if prompt_ids is not None else PROMPT
        return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, min_tokens=n))[0].outputs[0]

    return run


def post(root: str, route: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = 300) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(root + route, json=body or {}, headers=headers, timeout=timeout)


def complete(root: str, n: int = 12) -> dict:
    r = post(root, "/v1/completions", {"prompt": PROMPT, "max_tokens": n, "min_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


class Stream(threading.Thread):
    """A streamed completion in the background: its chunks, and `first` once one arrived."""

    def __init__(self, root: str, n: int, prompt: str = PROMPT):
        super().__init__(daemon=True)
        self.root, self.n, self.prompt = root, n, prompt
        self.chunks: list[dict] = []
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.n, "min_tokens": self.n, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", self.root + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.chunks.append(json.loads(line[6:]))
                        self.first.set()
        except BaseException as e:
            self.error = e
        self.first.set()

    def result(self) -> tuple[str, str | None, str | None]:
        """(text, finish_reason, weight_version of the last chunk)"""
        self.join(300)
        assert self.error is None and not self.is_alive(), self.error
        assert all("error" not in c for c in self.chunks), self.chunks[-1]
        last = self.chunks[-1]
        return "".join(c["choices"][0]["text"] for c in self.chunks), last["choices"][0]["finish_reason"], last["weight_version"]


def test_update_from_dirs_with_requests_in_flight(served, dirs, expected):
    """HF dir (another model), then dsv3-layout dir (the first model again): served greedy output = a
    fresh engine of the new checkpoint; the requests streaming during each update all finish; every
    response names its weight version."""
    r = complete(served)
    assert r["choices"][0]["text"] == expected("a").text != expected("b").text and r["weight_version"] == "0"
    for key, version, want_version in (("b", "b-1", "b-1"), ("c", None, "2")):  # "b-1" is no number: 2 updates
        streams = [Stream(served, 32) for _ in range(3)]
        for s in streams:
            assert s.first.wait(120)
        up = post(served, "/update_weights_from_disk", {"model_path": str(dirs[key]), "weight_version": version})
        assert up.status_code == 200, up.text
        assert up.json()["success"] is True and up.json()["weight_version"] == want_version
        for s in streams:
            assert s.result()[1] == "length"
        r = complete(served)
        assert r["choices"][0]["text"] == expected(key).text, key
        assert r["weight_version"] == want_version
        assert httpx.get(served + "/get_weight_version", headers=AUTH).json() == {"weight_version": want_version}


def test_bad_update_refused_old_weights_served(served, dirs):
    before = complete(served)
    r = post(served, "/update_weights_from_disk", {"model_path": str(dirs["bad"])})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "model.norm.weight [3] (expected [128])" in msg and "\n" not in msg
    r = post(served, "/update_weights_from_disk", {"model_path": str(dirs["a"] / "missing")})
    assert r.status_code == 400 and "not a checkpoint directory" in r.json()["error"]["message"]
    after = complete(served)
    assert after["choices"] == before["choices"] and after["weight_version"] == before["weight_version"]


def test_routes_need_the_key(served):
    from dsv3.serve.weight_sync import ROUTES

    for route in ROUTES:
        for key in (None, "wrong"):
            r = (httpx.get(served + route, headers={"Authorization": f"Bearer {key}"} if key else {})
                 if route in ("/get_weight_version", "/is_paused") else post(served, route, {"mode": "abort"}, key=key))
            assert r.status_code == 401, (route, key, r.status_code)
    assert post(served, "/flush_cache").status_code == 200


# extended: on a fast quiet machine the 480-token stream can finish before the abort lands (seen in CI:
# 'length', then the server left paused); the pause modes are asserted deterministically in process by
# tests/infer/test_weight_update.py::test_update_mid_request_and_pause_modes
@pytest.mark.extended
def test_pause_abort_wait_keep(served, dirs):
    # abort: the running request ends with "abort"; one sent during the pause waits, then runs in full
    s = Stream(served, 480)  # long: the pause lands while it runs
    assert s.first.wait(120)
    r = post(served, "/pause_generation", {"mode": "abort"})
    assert r.status_code == 200 and r.json()["idle"] is True
    assert s.result()[1] == "abort", s.chunks[-1]
    queued = Stream(served, 5)
    time.sleep(1.0)
    assert queued.is_alive() and not queued.chunks, queued.chunks
    assert post(served, "/continue_generation").status_code == 200
    assert queued.result()[1] == "length"
    # a pause is bounded: after max_pause_s generation resumes by itself and the queued request runs
    assert post(served, "/pause_generation", {"mode": "abort", "max_pause_s": 1}).status_code == 200
    assert Stream(served, 3).result()[1] == "length"
    assert httpx.get(served + "/is_paused", headers=AUTH).json()["is_paused"] is False
    # wait: the running request finishes in full before the pause answers; new ones wait
    s = Stream(served, 16)
    assert s.first.wait(120)
    r = post(served, "/pause?mode=wait", {"timeout_s": 120})  # vLLM's name
    assert r.json()["idle"] is True and httpx.get(served + "/is_paused", headers=AUTH).json()["is_paused"] is True
    assert s.result()[1] == "length"
    queued = Stream(served, 5)
    time.sleep(1.0)
    assert queued.is_alive() and not queued.chunks, queued.chunks
    post(served, "/resume")
    assert queued.result()[1] == "length"
    # keep: frozen mid-way (nothing streams during the pause), new weights, resumed: it finishes, its
    # tokens before the pause from the old weights, the rest from the new ones (their exact values:
    # tests/infer/test_weight_update.py::test_update_mid_request_and_pause_modes)
    assert post(served, "/update_weights_from_disk", {"model_path": str(dirs["c"]), "weight_version": "keep-c"}).status_code == 200
    s = Stream(served, N_KEEP)
    assert s.first.wait(120)
    assert post(served, "/pause_generation", {"mode": "keep"}).json()["idle"] is True
    time.sleep(0.5)
    frozen = len(s.chunks)
    time.sleep(0.5)
    assert len(s.chunks) == frozen and s.is_alive()
    up = post(served, "/update_weights_from_disk", {"model_path": str(dirs["b"]), "weight_version": "keep-b"})
    assert up.status_code == 200, up.text
    post(served, "/continue_generation")
    text, reason, version = s.result()
    assert reason == "length" and version == "keep-b" and len(s.chunks) > frozen
    assert s.chunks[frozen - 1]["weight_version"] == "keep-c"


def test_push_from_trainer_over_gloo(served, dirs, expected):
    """The trainer side (`dsv3.train.weight_sync`) joins a gloo group with the server and broadcasts a
    model's state dict; the server then serves exactly that model. A wrong shape is refused before any
    tensor moves, the old weights keep serving and the group stays usable."""
    from dsv3.errors import UserError
    from dsv3.train.weight_sync import WeightSyncClient
    from serve_helpers import randomize_

    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(REPO / "configs" / "tiny.yaml", ["model.max_position_embeddings=512"])
    model = Transformer(cfg)
    randomize_(model, std=0.08, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with WeightSyncClient(served, API_KEY) as sync:
        assert sync.push(state, version="trainer-1") == "trainer-1"
        r = complete(served)
        assert r["choices"][0]["text"] == expected(model).text and r["weight_version"] == "trainer-1"
        bad = dict(state)
        bad["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(4, 4)
        with pytest.raises(UserError, match=r"kv_b_proj.weight \[4, 4\]"):
            sync.push(bad)
        assert complete(served)["choices"] == r["choices"]
        # a subset is an update too (the final norm halved: the same greedy text, a new version)
        version = sync.push({"model.norm.weight": state["model.norm.weight"] * 0.5})
    r2 = complete(served)
    assert version != "trainer-1" and r2["weight_version"] == version and r2["choices"] == r["choices"]


@functools.cache
def _tok(model_dir):
    from dsv3.infer.loading import load_tokenizer_for

    return load_tokenizer_for(model_dir)
