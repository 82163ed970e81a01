"""The trainer's side of weight sync: push a model's weights into a running `dsv3 serve` over a
torch.distributed group (gloo on CPU, NCCL on CUDA), without a restart and without files.

    from dsv3.train.weight_sync import WeightSyncClient, push_weights
    with WeightSyncClient("http://127.0.0.1:8000", api_key="KEY") as sync:   # joins the group once
        for step in ...:
            train_step(...)
            version = sync.push(model, version=f"step-{step}")               # every step
    push_weights(model, "http://127.0.0.1:8000", api_key="KEY")              # one-off: join, push, leave

Call it on the trainer's rank 0 with a model (or state dict) holding full tensors: DTensors are gathered
with `full_tensor()`, which every rank of an FSDP / tensor-parallel trainer must then call too. The
trainer is rank 0 of the group and hosts its rendezvous store; the server is rank 1 (the protocol:
`dsv3.sync_group`). A refused update raises `UserError` with the server's one line, and the
server keeps its old weights.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Mapping

import torch
from torch import nn

from dsv3.errors import UserError
from dsv3.sync_group import DTYPES, SyncGroup, dtype_name, open_group

HTTP_TIMEOUT_S = 3600.0  # an update of a large model may take minutes; the group's timeout bounds the transfer


def post(url: str, route: str, body: dict | None, api_key: str | None, timeout: float = HTTP_TIMEOUT_S) -> dict:
    """POST `body` as JSON -> the JSON answer; an error answer raises `UserError` with the server's message."""
    data = json.dumps(body or {}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + route, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise UserError(f"{route}: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{route}: cannot reach {url} ({getattr(e, 'reason', e)})") from None


class _Call(threading.Thread):
    """One HTTP call in the background (the collective runs in this thread meanwhile)."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # handed to the caller
            self.error = e

    def get(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class WeightSyncClient:
    """A trainer's connection to one server: `init_group()` (also on `with`), `push(model)`, `pause(mode)`,
    `resume()`, `close()` (also on leaving `with`). `master_address` must be reachable from the server."""

    def __init__(self, url: str, api_key: str | None = None, *, master_address: str = "127.0.0.1",
                 master_port: int | None = None, backend: str | None = None, group_name: str = "weight_update_group",
                 timeout_s: float = 300.0):
        self.url, self.api_key = url, api_key
        self.master_address, self.master_port = master_address, master_port or free_port()
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_name, self.timeout_s = group_name, timeout_s
        self.group: SyncGroup | None = None

    def _post(self, route: str, body: dict | None = None) -> dict:
        return post(self.url, route, body, self.api_key)

    def init_group(self) -> None:
        """Open the group: the server joins it as rank 1 while this process hosts it as rank 0."""
        call = _Call(self._post, "/init_weights_update_group", {
            "master_address": self.master_address, "master_port": self.master_port, "rank_offset": 1, "world_size": 2,
            "group_name": self.group_name, "backend": self.backend, "timeout_s": self.timeout_s})
        try:
            self.group = open_group(self.master_address, self.master_port, 2, 0, self.backend, self.group_name, self.timeout_s)
        except UserError:
            call.get()  # the server's reason, when it refused
            raise
        call.get()

    def push(self, weights: nn.Module | Mapping[str, torch.Tensor], version: str | None = None) -> str:
        """Send every tensor of `weights` (a model: its state_dict) -> the server's new weight version."""
        if self.group is None:
            raise UserError("push: the group is not open (call init_group() or use `with WeightSyncClient(...)`)")
        g = self.group
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        tensors = {}
        for name, t in state.items():
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            dtype_name(t.dtype)  # a dtype the group carries, or one line
            tensors[name] = t.detach().to(g.device).contiguous()
        call = _Call(self._post, "/update_weights_from_distributed", {
            "names": list(tensors), "dtypes": [dtype_name(t.dtype) for t in tensors.values()],
            "shapes": [list(t.shape) for t in tensors.values()], "group_name": self.group_name, "weight_version": version})
        go = torch.zeros(1, dtype=torch.int32, device=g.device)
        work = g.broadcast_async(go, 1)  # the server's answer to the names / shapes: 1 go, 0 refused
        while not work.is_completed():
            if not call.is_alive():  # refused before the group was reached (e.g. no group, bad key)
                call.get()
                raise UserError("/update_weights_from_distributed: the server answered without taking part")
            time.sleep(0.005)
        work.wait()
        if int(go.item()) != 1:
            call.get()  # raises the server's one line
            raise UserError("/update_weights_from_distributed: refused by the server")
        for t in tensors.values():
            g.broadcast(t, 0)
        return call.get()["weight_version"]

    def pause(self, mode: str = "abort", timeout_s: float = 60.0, max_pause_s: float = 600.0) -> dict:
        return self._post("/pause_generation", {"mode": mode, "timeout_s": timeout_s, "max_pause_s": max_pause_s})

    def resume(self) -> dict:
        return self._post("/continue_generation")

    def close(self) -> None:
        if self.group is not None:
            self.group = None
            self._post("/destroy_weights_update_group", {"group_name": self.group_name})

    def __enter__(self) -> "WeightSyncClient":
        self.init_group()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def push_weights(weights: nn.Module | Mapping[str, torch.Tensor], url: str, api_key: str | None = None,
                 version: str | None = None, **client_kwargs) -> str:
    """Join the server's group, push `weights` once, leave -> the new weight version."""
    with WeightSyncClient(url, api_key, **client_kwargs) as sync:
        return sync.push(weights, version)


__all__ = ["DTYPES", "WeightSyncClient", "post", "push_weights"]
