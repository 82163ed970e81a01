"""Tensor memory accounting by storage lifetime, for any device (meta included).

`TensorMemory` is a TorchDispatchMode: every tensor an operator returns is charged with its
storage's bytes until that storage dies (a weak reference's callback), so `live` is the bytes of
tensors alive now and `peak` the most ever alive at once, per device. Tensor subclasses (DTensor,
FSDP's parameters) are charged through their inner tensors. Tensors that existed before the mode was
entered are not seen unless `track()` is called on them.

Two users: `dsv3 train --report-memory` measures a real run's peak tensor memory on CPU (where torch
has no allocator statistics), and `dsv3 dryrun` runs the model's own layers on fake tensors (torch's
FakeTensorMode: shapes, dtypes and devices, no storage) to find what one micro-batch's forward keeps
for backward. `meta_routing` makes the model's one data-dependent step (the MoE's `bincount` of the
routing, read back on the host) answer as a perfectly balanced router would.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


def compute_dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def to_fake(model: nn.Module, fake) -> None:
    """Replace the meta parameters and buffers of `model` by fake CPU tensors of the same shapes."""
    conv = fake.fake_tensor_converter
    cpu = torch.device("cpu")
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(conv.from_meta_and_device(fake, p, cpu), requires_grad=p.requires_grad)
        for name, buf in list(m._buffers.items()):
            if buf is not None:
                m._buffers[name] = conv.from_meta_and_device(fake, buf, cpu)


def _storages(t: torch.Tensor) -> list:
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        inner = [getattr(t, a) for a in attrs]
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
        return []


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensors created while the mode is active (see the module docstring)."""

    def __init__(self, meta_routing: bool = False):
        super().__init__()
        self.meta_routing = meta_routing
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._refs: dict[int, weakref.ref] = {}
        self._sizes: dict[int, int] = {}
        self._ignored: set[int] = set()
        self._resize = None

    def track(self, *tensors) -> None:
        """Charge tensors created outside the mode (e.g. an input made before it)."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._charge(st)

    def ignore(self, *tensors) -> None:
        """Storages never to charge (the model's parameters and buffers, counted as model states):
        views of them (a weight's transpose, one expert's slice) are then free too."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._charge(st, nbytes=0)
                    self._ignored.add(id(st))

    def _charge(self, st, nbytes: int | None = None) -> None:
        key = id(st)
        if key in self._refs and self._refs[key]() is st:
            return
        nbytes, dev = st.nbytes() if nbytes is None else nbytes, st.device.type

        def freed(_ref, key=key, dev=dev):
            if self._refs.get(key) is _ref:
                del self._refs[key]
                self._ignored.discard(key)
                self.live[dev] -= self._sizes.pop(key)

        self._refs[key] = weakref.ref(st, freed)
        self._sizes[key] = nbytes
        self._add(dev, nbytes)

    def _add(self, dev: str, nbytes: int) -> None:
        self.live[dev] += nbytes
        if self.live[dev] > self.peak[dev]:
            self.peak[dev] = self.live[dev]

    def __enter__(self):
        # FSDP2 frees and re-allocates its unsharded weights with `UntypedStorage.resize_`, which is
        # no operator: follow it (as torch's own MemTracker does).
        real = self._resize = torch.UntypedStorage.resize_

        def resize_(st, size):
            key = id(st)
            out = real(st, size)
            if key in self._refs and self._refs[key]() is st and key not in self._ignored:
                self._add(st.device.type, size - self._sizes[key])
                self._sizes[key] = size
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = defaultdict(int, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.meta_routing:
            out = self._meta_op(func, args, kwargs)
            if out is not NotImplemented:
                self.track(out)
                return out
        out = func(*args, **kwargs)
        self.track(out)
        return out

    def _meta_op(self, func, args, kwargs):
        """Shapes-only execution (fake tensors): a balanced routing for the data-dependent `bincount`."""
        if func is torch.ops.aten.bincount.default and _is_fake(args[0]):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            n = args[0].numel()
            # aten's schema bincount(self, weights=None, minlength=0): the dispatcher passes minlength
            # positionally, so a keyword-only read would put every token on one expert
            minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
            bins = max(int(minlength), 1)
            base, rem = divmod(n, bins)  # every bin the same count (the remainder to the first ones)
            with unset_fake_temporarily():
                counts = torch.full((bins,), base, dtype=torch.int64)
                counts[:rem] += 1
            return counts  # a real host tensor: `.tolist()` works; fake tensor mode lifts it where it meets fakes
        return NotImplemented


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class report_memory:
    """`dsv3 train --report-memory DIR`: the run under `TensorMemory`; at the end each rank writes
    DIR/memory-rank{RANK}.json with its peak tensor bytes (per device), its peak resident set size
    above the one before the run (`ru_maxrss`, the process's high-water mark) and, on CUDA,
    `torch.cuda.max_memory_allocated`."""

    def __init__(self, directory: str):
        self.dir = directory

    def __enter__(self):
        import os

        self.rss0 = _rss()
        self.maxrss0 = _maxrss()
        self.mode = TensorMemory()
        self.mode.__enter__()
        self.rank = int(os.environ.get("RANK", "0"))
        return self.mode

    def __exit__(self, *exc):
        import json
        import os
        from pathlib import Path

        self.mode.__exit__(*exc)
        rec = {"rank": self.rank, "peak_tensor_bytes": dict(self.mode.peak), "rss_before_bytes": self.rss0,
               "peak_rss_bytes": max(_maxrss(), self.maxrss0), "peak_rss_above_start_bytes": _maxrss() - self.rss0}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the allocator's own figure
            rec["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        d = Path(self.dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".memory-rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, d / f"memory-rank{self.rank}.json")
        return False


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
