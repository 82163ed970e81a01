"""`dsv3 serve`'s weight-sync routes: new weights and pause / resume without a restart (SGLang's names;
vLLM's equivalents and curl examples in docs/serving.md §"Weights without a restart").

    POST /update_weights_from_disk        {"model_path", "weight_version"?, "abort_all_requests"?}
    POST /init_weights_update_group       {"master_address", "master_port", "rank_offset", "world_size",
                                           "group_name"?, "backend"?, "timeout_s"?}
    POST /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name"?, "weight_version"?}
    POST /destroy_weights_update_group    {"group_name"?}
    POST /pause_generation                {"mode": "abort" | "wait" | "keep", "timeout_s"?, "max_pause_s"?}
    POST /continue_generation
    POST /flush_cache
    GET  /get_weight_version
    vLLM's names: POST /pause?mode=..., POST /resume, GET /is_paused, POST /reset_prefix_cache

Every route needs the server's API key (`--api-key`): without one they answer 403, since they let a
caller replace the model, read a directory of the server's disk or stop generation. Updates are
staged (read, checked, quantised) in a worker thread while requests go on with the old weights, then
applied between two engine steps under the engine lock (`LLMEngine.apply_weights`); one update or
group change at a time (409 for a second); a failure leaves the old weights serving. A pause lasts at
most `max_pause_s` (default 600 s): then generation resumes by itself (a warning in the log), so a
trainer that dies mid-sync never stalls the queued requests for good.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

import torch
from fastapi import FastAPI, Request

from dsv3.errors import UserError
from dsv3 import sync_group
from dsv3.infer.control import PAUSE_MODES
from dsv3.infer.weights import MAX_TENSORS, check_tensors
from dsv3.serve.async_engine import AsyncEngine
from dsv3.serve.protocol import APIError, _Request, parse_request

log = logging.getLogger("dsv3.serve")

ROUTES = ("/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
          "/destroy_weights_update_group", "/pause_generation", "/continue_generation", "/flush_cache",
          "/reset_prefix_cache", "/get_weight_version", "/pause", "/resume", "/is_paused")
MAX_NAME_CHARS = 512
MAX_PATH_CHARS = 4096
DEFAULT_GROUP = "weight_update_group"


class UpdateFromDisk(_Request):
    model_path: str
    weight_version: str | None = None
    abort_all_requests: bool = False


class InitGroup(_Request):
    master_address: str
    master_port: int
    rank_offset: int = 1
    world_size: int = 2
    group_name: str = DEFAULT_GROUP
    backend: str | None = None  # default: nccl when the engine runs on CUDA, else gloo
    timeout_s: float = 300.0


class UpdateFromDistributed(_Request):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP
    weight_version: str | None = None
    abort_all_requests: bool = False


class GroupName(_Request):
    group_name: str = DEFAULT_GROUP


class Pause(_Request):
    mode: str = "abort"
    timeout_s: float = 60.0  # how long the answer waits for the pause to take hold ("wait": running ones finish)
    max_pause_s: float = 600.0


def _between(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise APIError(f"'{name}' must be within [{lo:g}, {hi:g}], got {value!r}", param=name)


class WeightSync:
    """The routes' state: the engine front, the trainer's group (at most one), the pause's deadline."""

    def __init__(self, aengine: AsyncEngine):
        self.aengine, self.engine = aengine, aengine.engine
        self.group: sync_group.SyncGroup | None = None
        self._busy = threading.Lock()  # one update or group change at a time
        self._pause_serial = 0

    # ---- running work off the event loop
    async def _exclusive(self, fn: Callable, *args):
        """Run `fn(*args)` in a worker thread, one at a time; the thread releases the slot itself (a
        client that goes away does not cut an update short)."""
        if not self._busy.acquire(blocking=False):
            raise APIError("another weight update or group change is in progress; retry when it has finished", 409)

        def run():
            try:
                return fn(*args)
            finally:
                self._busy.release()

        return await _user_errors(asyncio.to_thread(run))

    def _locked(self, fn: Callable, *args):
        """`fn(*args)` between two engine steps."""
        with self.aengine.lock:
            out = fn(*args)
        self.aengine.wake()
        return out

    def _apply(self, staged, version: str | None, abort_all: bool) -> dict:
        def apply():
            if abort_all:
                self.engine.pause_generation("abort")  # the aborts are taken at the next step
                self.engine.continue_generation()
            return self.engine.apply_weights(staged, version)

        t0 = time.perf_counter()
        version = self._locked(apply)
        log.info("weights updated to version %s (%d tensors; engine held %.3f s)", version, staged.names,
                 time.perf_counter() - t0)
        return {"success": True, "message": f"updated {staged.names} tensors", "weight_version": version}

    # ---- updates
    def update_from_disk(self, req: UpdateFromDisk) -> dict:
        if not req.model_path or len(req.model_path) > MAX_PATH_CHARS:
            raise UserError(f"'model_path' must be a path of 1-{MAX_PATH_CHARS} characters")
        staged = self.engine.stage_weights(req.model_path, req.weight_version)
        return self._apply(staged, req.weight_version, req.abort_all_requests)

    def init_group(self, req: InitGroup) -> dict:
        if self.group is not None:
            raise UserError(f"a weight-sync group ({self.group.name!r}) is open; POST /destroy_weights_update_group first")
        if getattr(self.engine.runner, "parallel", None) is not None:
            raise UserError("weight sync: a tensor/expert-parallel engine cannot take new weights in place yet")
        if not 1 <= req.rank_offset < req.world_size or req.world_size != req.rank_offset + 1:
            raise UserError(f"this server is one rank: world_size must be rank_offset + 1 and rank_offset >= 1 "
                            f"(the trainer is rank 0), got rank_offset {req.rank_offset}, world_size {req.world_size}")
        if not 1 <= req.master_port <= 65535 or not req.master_address or len(req.master_address) > 255:
            raise UserError(f"bad rendezvous address {req.master_address[:60]!r}:{req.master_port}")
        backend = req.backend or ("nccl" if self.engine.device.type == "cuda" else "gloo")
        self.group = sync_group.open_group(req.master_address, req.master_port, req.world_size, req.rank_offset,
                                           backend, req.group_name[:MAX_NAME_CHARS], req.timeout_s)
        log.info("joined weight-sync group %r (%s) as rank %d of %d", req.group_name, backend, req.rank_offset, req.world_size)
        return {"success": True, "message": f"joined group {req.group_name!r} as rank {req.rank_offset}"}

    def destroy_group(self, req: GroupName) -> dict:
        g = self._group(req.group_name)
        self.group = None
        del g
        return {"success": True, "message": f"left group {req.group_name!r}"}

    def _group(self, name: str) -> sync_group.SyncGroup:
        if self.group is None or self.group.name != name:
            raise UserError(f"no weight-sync group {name[:60]!r} is open; POST /init_weights_update_group first")
        return self.group

    def update_from_distributed(self, req: UpdateFromDistributed) -> dict:
        g = self._group(req.group_name)
        try:
            tensors = self._receive(g, req)
        except RuntimeError as e:  # the trainer went away mid-update: nothing was applied
            self.group = None
            first = (str(e).strip().splitlines() or ["broadcast failed"])[0][:200]
            raise UserError(f"the weight-sync group failed ({first}); nothing was applied; the group is closed "
                            f"(init it again)") from None
        staged = self.engine.stage_weights(tensors, req.weight_version)
        return self._apply(staged, req.weight_version, req.abort_all_requests)

    def _receive(self, g: sync_group.SyncGroup, req: UpdateFromDistributed) -> dict[str, torch.Tensor]:
        """Go / no-go to the trainer (a refused description: no tensor moves), then the tensors in order."""
        try:
            spec = self._check_spec(req)
        except UserError:
            g.broadcast(torch.zeros(1, dtype=torch.int32, device=g.device), g.rank)
            raise
        g.broadcast(torch.ones(1, dtype=torch.int32, device=g.device), g.rank)
        tensors = {}
        for name, dtype, shape in spec:
            tensors[name] = torch.empty(shape, dtype=dtype, device=g.device)
            g.broadcast(tensors[name], 0)
        return tensors

    def _check_spec(self, req: UpdateFromDistributed) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        n = len(req.names)
        if not n or n > MAX_TENSORS or len(req.dtypes) != n or len(req.shapes) != n:
            raise UserError(f"'names', 'dtypes' and 'shapes' must have the same length, 1 to {MAX_TENSORS}; got "
                            f"{n}, {len(req.dtypes)}, {len(req.shapes)}")
        if len(set(req.names)) != n:
            raise UserError("'names' holds a name twice")
        spec = []
        for name, dt, shape in zip(req.names, req.dtypes, req.shapes):
            if dt not in sync_group.DTYPES:
                raise UserError(f"{name[:120]}: dtype {dt[:40]!r} is not one of {', '.join(sync_group.DTYPES)}")
            if len(shape) > 4 or any(d < 0 for d in shape):
                raise UserError(f"{name[:120]}: bad shape {shape[:8]}")
            spec.append((name, sync_group.DTYPES[dt], tuple(shape)))
        meta = {name: torch.empty(shape, dtype=dt, device="meta") for name, dt, shape in spec}
        check_tensors(meta, self.engine.model_config, "update_weights_from_distributed")
        return spec

    # ---- pause / resume
    def pause(self, req: Pause) -> dict:
        self._locked(self.engine.pause_generation, req.mode)
        deadline = time.monotonic() + req.timeout_s
        while not self.engine.generation_idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        return {"success": True, "mode": req.mode, "idle": self.engine.generation_idle()}

    def resume(self) -> dict:
        self._locked(self.engine.continue_generation)
        return {"success": True}


async def _user_errors(coro):
    try:
        return await coro
    except UserError as e:
        raise APIError(str(e), 400) from None


def add_routes(app: FastAPI, aengine: AsyncEngine, api_key: str | None, max_json_depth: int) -> WeightSync:
    """Register the weight-sync routes on `app` (auth: `middleware.AuthAndCount` checks the key on ROUTES)."""
    ws = WeightSync(aengine)

    async def body(request: Request, model):
        if not api_key:
            raise APIError("the weight-sync routes need the server to run with --api-key", 403)
        raw = await request.body()
        return await asyncio.to_thread(parse_request, raw or b"{}", model, max_json_depth)

    def exclusive(route: str, model, method: Callable) -> None:
        async def handler(request: Request):
            req = await body(request, model)
            if isinstance(req, InitGroup):
                _between("timeout_s", req.timeout_s, 1, 3600)
            return await ws._exclusive(method, req)

        app.post(route)(handler)

    exclusive("/update_weights_from_disk", UpdateFromDisk, ws.update_from_disk)
    exclusive("/init_weights_update_group", InitGroup, ws.init_group)
    exclusive("/update_weights_from_distributed", UpdateFromDistributed, ws.update_from_distributed)
    exclusive("/destroy_weights_update_group", GroupName, ws.destroy_group)

    @app.post("/pause_generation")
    @app.post("/pause")  # vLLM's name, with its `?mode=` query
    async def pause_generation(request: Request):
        req = await body(request, Pause)
        if "mode" in request.query_params:
            req.mode = request.query_params["mode"]
        if req.mode not in PAUSE_MODES:
            raise APIError(f"'mode' must be one of {', '.join(PAUSE_MODES)}, got {req.mode[:40]!r}", param="mode")
        _between("timeout_s", req.timeout_s, 0, 3600)
        _between("max_pause_s", req.max_pause_s, 1, 86400)
        ws._pause_serial += 1
        serial = ws._pause_serial
        asyncio.get_running_loop().call_later(req.max_pause_s, lambda: _auto_resume(ws, serial, req.max_pause_s))
        return await _user_errors(asyncio.to_thread(ws.pause, req))

    @app.post("/continue_generation")
    @app.post("/resume")  # vLLM's name
    async def continue_generation(request: Request):
        await body(request, _Request)
        ws._pause_serial += 1
        return await asyncio.to_thread(ws.resume)

    async def flush(request: Request):
        await body(request, _Request)
        await asyncio.to_thread(ws._locked, ws.engine.flush_cache)
        return {"success": True}

    app.post("/flush_cache")(flush)
    app.post("/reset_prefix_cache")(flush)

    @app.get("/get_weight_version")
    async def get_weight_version(request: Request):
        await body(request, _Request)
        return {"weight_version": ws.engine.weight_version}

    @app.get("/is_paused")  # vLLM's
    async def is_paused(request: Request):
        await body(request, _Request)
        return {"is_paused": ws.engine.paused is not None, "mode": ws.engine.paused}

    return ws


def _auto_resume(ws: WeightSync, serial: int, after_s: float) -> None:
    if ws._pause_serial == serial and ws.engine.paused is not None:
        log.warning("generation was paused for %g s (max_pause_s) without /continue_generation: resuming", after_s)
        ws._pause_serial += 1
        threading.Thread(target=ws.resume, name="dsv3-auto-resume", daemon=True).start()
