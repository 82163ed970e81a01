"""An asyncio front over the synchronous `LLMEngine`.

One background thread calls `engine.step()` while there is work and hands each `RequestOutput`
to the asyncio queue of its request (`loop.call_soon_threadsafe`), so the event loop never blocks
on a model forward. `engine.add_request` / `abort_request` are thread-safe (validation and a locked
hand-over; the step thread picks them up). `abort_request` is cheap and runs on the event loop;
`add_request` may compile a grammar (seconds for a large schema) and runs in a worker thread, and a
bad request fails with its ValueError. `step()` and `cache_info()` run only in the
stepping thread; /metrics reads the snapshot taken after each step.

A request's async generator aborts the request in its `finally` block, so a cancelled handler
(client disconnect, server shutdown) frees the request's KV-cache blocks.

When `step()` raises, the requests in flight are checked one by one (`probe_sampling`: their
sampling parameters through the real sampling code on a one-row batch). Requests that fail the
check are failed alone; the others are recomputed (`engine.recompute_running()`) and go on. Only
when no request explains the failure (a real engine fault) do all in-flight requests fail.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dsv3.serve")


class EngineDeadError(RuntimeError):
    """The stepping thread stopped; no request can be served."""

    http_status = 503


class EngineStepError(RuntimeError):
    """`engine.step()` failed: 400 when this request's own parameters caused it, else 500."""

    def __init__(self, message: str, culprit: bool = False):
        super().__init__(message)
        self.http_status = 400 if culprit else 500


def probe_sampling(params, vocab_size: int) -> None:
    """Run one request's sampling parameters through the engine's sampling code on a one-row batch
    of CPU logits; raises whatever that request alone would make `step()` raise."""
    import torch

    from dsv3.infer.sampling import add_penalties, apply_penalties, make_batch, sample, topn_logprobs

    params.validate(vocab_size)
    gen = None
    if params.seed is not None:
        gen = torch.Generator()
        gen.manual_seed(params.seed + params.n - 1)
    logits = torch.zeros(1, vocab_size)
    batch = make_batch([params], [gen], vocab_size, logits.device)
    if add_penalties(batch, [params], logits.device):
        counts = torch.zeros(1, vocab_size)
        logits = apply_penalties(logits, batch, counts, counts)
    chosen = sample(logits, batch)
    for k in (params.logprobs, params.prompt_logprobs):
        if k is not None:
            topn_logprobs(logits.log_softmax(-1), chosen, k)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    params: Any = None
    finished: bool = False


@dataclass
class EngineStats:
    """Counters read by /metrics (written by the stepping thread only)."""

    steps: int = 0
    running: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)  # engine.stats(): prefix-cache / spec-decode counters
    step_seconds_total: float = 0.0


class AsyncEngine:
    def __init__(self, engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = int(engine.max_model_len)
        self.lock = threading.Lock()
        self.stats = EngineStats()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._refresh_cache_info()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    def prepare_guided(self) -> None:
        """Build the engine's llguidance view of the tokenizer now, before serving: building it holds the
        GIL for 1-2 s (a Rust constructor over the 129k-token vocabulary), which stalled every request,
        /health included, when the first guided request did it. Without llguidance there is nothing to
        build (guided requests then answer with the install hint)."""
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return
        if getattr(self.engine, "tokenizer", None) is None:
            return
        self.engine.prepare_guided()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ---------------------------------------------------------------- asyncio side
    async def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                          params, cache_salt: str | None = None) -> "RequestStream":
        """Add a request; return its output stream once the engine accepted it.

        Raises ValueError (from `engine.add_request`) for input the engine rejects, and
        EngineDeadError when the stepping thread is gone."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running (the server log has the details)")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), params)
        self._streams[request_id] = stream
        # in a worker thread: it builds the request's grammar matcher (seconds for a large schema)
        added = loop.run_in_executor(None, functools.partial(self.engine.add_request, request_id, prompt, prompt_token_ids,
                                                             params, cache_salt=cache_salt))
        try:
            await asyncio.shield(added)
        except asyncio.CancelledError:  # the caller went away; the request may still be added: abort it then
            self._streams.pop(request_id, None)
            added.add_done_callback(lambda f: f.cancelled() or f.exception() or self.abort(request_id))
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        return RequestStream(self, request_id, stream)

    def wake(self) -> None:
        """Have the stepping thread look for work now (after a pause ends or weights change)."""
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    # ---------------------------------------------------------------- stepping thread
    def _refresh_cache_info(self) -> None:
        try:
            self.stats.cache = dict(self.engine.cache_info())
            self.stats.engine = dict(self.engine.stats())
        except Exception:  # cache_info is informational; never let it kill the loop
            log.exception("engine.cache_info() failed")

    def _deliver(self, outputs) -> None:
        # One thread-safe callback per event loop per step (each one writes to the loop's self-pipe).
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail(self, request_ids, err: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
            try:
                self.engine.abort_request(rid)
            except Exception:  # the request is failed already; an engine that cannot drop it is logged, not hidden
                log.exception("engine.abort_request(%s) failed while failing the request", rid)

    def _step_failed(self, err: Exception) -> None:
        """step() raised: fail the requests whose own parameters explain it, recompute the others;
        when none does (a real engine fault), fail every in-flight request."""
        vocab = int(getattr(getattr(self.engine, "model_config", None), "vocab_size", 0) or 0)
        culprits = []
        for rid, stream in list(self._streams.items()):
            if stream.params is None or not vocab:
                continue
            try:
                probe_sampling(stream.params, vocab)
            except Exception as probe_err:
                culprits.append((rid, probe_err))
        if culprits:
            log.error("engine.step() failed (%s); failing the %d request(s) that cause it: %s", err,
                      len(culprits), ", ".join(rid for rid, _ in culprits))
            for rid, probe_err in culprits:
                self._fail([rid], EngineStepError(f"the engine cannot run this request's sampling "
                                                  f"parameters ({probe_err})", culprit=True))
            try:
                self.engine.recompute_running()
                return
            except Exception:
                log.exception("engine.recompute_running() failed")
        log.error("engine.step() failed; failing the %d in-flight request(s)", len(self._streams), exc_info=err)
        self._fail(list(self._streams), EngineStepError(f"engine step failed: {err}"))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    busy = self.engine.has_unfinished_requests()
                    outputs = []
                    if busy:
                        t0 = time.perf_counter()
                        try:
                            outputs = self.engine.step()
                        except Exception as e:
                            self._step_failed(e)
                            outputs = []
                        self.stats.step_seconds_total += time.perf_counter() - t0
                        self.stats.steps += 1
                        self._deliver(outputs)
                    self.stats.running = len(self._streams)
                    self._refresh_cache_info()
                if not busy or (not outputs and self.engine.paused is not None):  # paused: queued requests wait
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            self._error = e
            log.exception("engine thread died")
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError("the engine stopped"))


class RequestStream:
    """Async iterator over one request's cumulative `RequestOutput`s (the newest available at each
    step), ending with the finished one.

    `close()` (called by the iterator's `finally`, and safe to call again) aborts the request if it
    has not finished, which frees its KV-cache blocks: handlers close every stream they open."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream):
        self.engine, self.request_id, self._stream = engine, request_id, stream
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._stream.finished

    async def __aiter__(self):
        try:
            queue = self._stream.queue
            while not self._stream.finished:
                item = await queue.get()
                # Outputs are cumulative: when the consumer fell behind, only the newest matters
                # (one SSE chunk then carries several tokens, as in vLLM).
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self._stream.finished = True
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.request_id, None)
        if not self._stream.finished:
            self.engine.abort(self.request_id)


def _put_all(items) -> None:
    for queue, out in items:
        queue.put_nowait(out)
