"""Multi-process execution of one engine: rank 0 schedules and samples, every rank runs the forward.

Rank 0 runs the whole `LLMEngine` (scheduler, sampling, detokenising, HTTP). Its model runner is
wrapped in a `DriverRunner`: every forward call (`prefill`, `decode`, `mtp_prefill`, `mtp_decode`)
is first broadcast on a gloo control group — the method name and its plain-Python arguments (token
ids, positions, block tables) — and then run locally. Follower ranks loop in `follow()`: receive the
call, run the same method on their own runner (their own shard of the model, their own KV cache at
the same slots), repeat. With tensor/expert parallelism the forward's own collectives keep the
ranks in lockstep, and every rank ends with the same full logits.

Sampling happens on rank 0 only, and followers never see the tokens except as the next step's
inputs. Why not "every rank samples with the same seed": the sampling state is much more than a
seed (per-request generators advanced by every draw, grammar matchers, penalties over the output so
far, stop strings on the detokenised text, speculative drafts); replicating it on every rank means N
copies that must never diverge, while broadcasting the step's inputs is one small message that
the forward needs anyway. It is also how vLLM's driver worker works.

Arguments that are results of an earlier call on the same rank (the packed prefill addressing and
hidden states the MTP drafter takes) are sent as references and resolved on each follower to its
own copy, so no tensor crosses the control group.

Liveness: every `heartbeat_s` rank 0 sends a ping (between forwards) and gathers each rank's
counters (the requests it holds cache for, forward calls, weight and cache bytes) — so an idle
server never trips the followers' receive timeout, and `engine.stats()["ranks"]` is at most one
heartbeat old. A failed
or timed-out collective is fatal on either side: one log line, non-zero exit, never a hang.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("dsv3.infer")

FORWARDS = ("prefill", "decode", "mtp_prefill", "mtp_decode")  # runner methods every rank runs


@dataclass(frozen=True)
class Ref:
    """Element `index` of the last result of runner method `method` (resolved on each rank)."""

    method: str
    index: int


def fatal(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit at once (other threads may be blocked in a collective that
    will never finish, so no clean interpreter shutdown is attempted)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _brief(e: BaseException) -> str:
    """An exception as a short one-liner (gloo's messages run long)."""
    text = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def rank_info(runner, rank: int) -> dict:
    """This rank's resident bytes (model weights: parameters + buffers; the KV cache) and torch CPU threads."""
    model = runner.model
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"rank": rank, "pid": os.getpid(), "weight_bytes": int(weights), "cache_bytes": int(runner.cache.data.nbytes),
            "threads": torch.get_num_threads()}


class _Results:
    """The last result of each forward method, addressable by `Ref`."""

    def __init__(self):
        self.last: dict[str, tuple] = {}

    def keep(self, method: str, result) -> None:
        self.last[method] = result if isinstance(result, tuple) else (result,)

    def to_refs(self, args: tuple) -> tuple:
        out = []
        for a in args:
            ref = next((Ref(m, i) for m, res in self.last.items() for i, r in enumerate(res) if r is a), None)
            if ref is None and isinstance(a, torch.Tensor):
                raise TypeError("DriverRunner: tensor arguments must come from an earlier forward (sent as references)")
            out.append(ref if ref is not None else a)
        return tuple(out)

    def resolve(self, args: tuple) -> tuple:
        return tuple(self.last[a.method][a.index] if isinstance(a, Ref) else a for a in args)


class DriverRunner:
    """Rank 0's runner: broadcasts each forward to the followers, then runs it locally.

    `step_requests` (set by the engine at each step): the ids of the requests whose sequences hold
    KV cache; sent with every message, and reported back by each follower, which shows an aborted
    request leaving every rank."""

    def __init__(self, runner, group, world_size: int, heartbeat_s: float = 2.0,
                 on_fatal: Callable[[str], None] = fatal, on_shutdown: Optional[Callable[[], None]] = None):
        self.local = runner
        self.group = group
        self.world_size = world_size
        self.step_requests: list[str] = []
        self.ranks: list[dict] = []  # per-rank counters from the last ping (rank 0 first)
        self._results = _Results()
        self._calls = 0
        self._lock = threading.Lock()
        self._closed = False
        self._on_fatal = on_fatal
        self._on_shutdown = on_shutdown
        self._info = rank_info(runner, 0)
        self._stop = threading.Event()
        self._heartbeat_s = heartbeat_s
        self.ping()
        self._thread = threading.Thread(target=self._heartbeat, name="dsv3-heartbeat", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # everything but the forwards reads the local runner
        return getattr(self.local, name)

    def _send(self, msg: tuple) -> None:
        try:
            dist.broadcast_object_list([msg], src=0, group=self.group)
        except Exception as e:  # a follower died or timed out: nothing more can be computed
            self._on_fatal(f"dsv3: rank 0 lost contact with the follower ranks ({_brief(e)}); shutting down")
            raise

    def _forward(self, method: str, *args):
        with self._lock:
            if self._closed:
                raise RuntimeError("the multi-process engine was shut down")
            self._send(("call", method, self._results.to_refs(args), list(self.step_requests)))
            self._calls += 1
        try:
            result = getattr(self.local, method)(*args)
        except RuntimeError as e:  # a collective inside the forward lost a follower: the same one line
            if not (isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
                raise  # a fault of this step (the engine attributes it to a request)
            self._on_fatal(f"dsv3: rank 0 lost contact with the follower ranks ({_brief(e)}); shutting down")
            raise
        self._results.keep(method, result)
        return result

    def prefill(self, chunks, all_logits=None, return_hidden=False):
        return self._forward("prefill", chunks, all_logits, return_hidden)

    def decode(self, token_ids, positions, tables, return_hidden=False):
        return self._forward("decode", token_ids, positions, tables, return_hidden)

    def mtp_prefill(self, pk, hidden, next_ids):
        return self._forward("mtp_prefill", pk, hidden, next_ids)

    def mtp_decode(self, hidden, next_ids, positions, tables):
        return self._forward("mtp_decode", hidden, next_ids, positions, tables)

    # ---- liveness and per-rank counters
    def ping(self) -> list[dict]:
        """Round trip to every rank; returns (and keeps in `ranks`) each rank's counters."""
        with self._lock:
            if self._closed:
                return self.ranks
            self._send(("ping", list(self.step_requests)))
            mine = {**self._info, "forward_calls": self._calls, "requests": list(self.step_requests)}
            got: list = [None] * self.world_size
            try:
                dist.all_gather_object(got, mine, group=self.group)
            except Exception as e:
                self._on_fatal(f"dsv3: rank 0 lost contact with the follower ranks ({_brief(e)}); shutting down")
                raise
            self.ranks = got
            return got

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self.ping()
            except Exception:
                return

    def shutdown(self) -> None:
        """Tell the followers to exit (idempotent); then the launcher's cleanup (join workers, destroy the group)."""
        self._stop.set()
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    dist.broadcast_object_list([("stop",)], src=0, group=self.group)
                except Exception as e:  # followers already gone: the launcher's cleanup below still runs
                    log.warning("shutdown: could not tell the follower ranks to stop (%s)", e)
        if self._on_shutdown is not None:
            cb, self._on_shutdown = self._on_shutdown, None
            cb()


def follow(runner, group, rank: int) -> None:
    """A follower rank's loop: run each forward rank 0 sends, answer pings, return on 'stop'.
    Losing rank 0 (error or timeout on the control group) is fatal: one line, exit 1."""
    results = _Results()
    info = rank_info(runner, rank)
    calls, requests = 0, []
    while True:
        box: list = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except Exception as e:
            fatal(f"dsv3: rank {rank} lost contact with rank 0 ({_brief(e)}); exiting")
        msg = box[0]
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "ping":
            requests = msg[1]
            got: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(got, {**info, "forward_calls": calls, "requests": requests}, group=group)
            continue
        _, method, args, requests = msg
        if method not in FORWARDS:
            fatal(f"dsv3: rank {rank}: unknown call {method!r} from rank 0 (mismatched dsv3 versions?)")
        try:
            with torch.inference_mode():
                results.keep(method, getattr(runner, method)(*results.resolve(args)))
        except Exception as e:
            log.exception("rank %d: %s failed", rank, method)
            fatal(f"dsv3: rank {rank}: {method} failed ({type(e).__name__}: {e}); exiting")
        calls += 1
