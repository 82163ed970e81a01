"""How many torch CPU threads a dsv3 process computes with, and why.

Order: an explicit count (`dsv3 --threads N <verb>` or the verb's own `--threads N`), then
`$DSV3_NUM_THREADS` (the CLI exports an explicit count there, for the processes it starts), then
a training YAML's `train.threads` (the trainer applies it), then `$OMP_NUM_THREADS` (torch's own
variable; torchrun sets it to 1, `dsv3 launch` to its per-worker choice), then an automatic choice:
the CPUs this process may run on (its affinity mask) minus the CPUs other work keeps busy, split
over the processes of one job on this machine, at least 1, at most torch's default.

Why not torch's default (one thread per physical core): on a machine other jobs already load,
OpenMP threads that cannot all run at once wait at every parallel region's barrier for the one that
was descheduled. On a 2-core VM at load 5-8 (issue 25's report), 2 threads trained 3x slower than 1
and decoded 10-15x slower; on a quiet machine the automatic choice is torch's own count, as before.

"Busy" is the larger of the 1-minute load average and the tasks runnable right now (the median of
a few readings of /proc/loadavg over ~40 ms, this process and its sibling ranks not counted): the
average alone lags a minute behind a job that just started, the instant count alone is noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from dsv3.errors import UserError

ENV = "DSV3_NUM_THREADS"
HELP = (f"torch CPU threads (default: ${ENV}, else $OMP_NUM_THREADS, else the CPUs not busy with other work, split "
        "over this job's processes on the machine; the choice and its reason are logged)")


@dataclass(frozen=True)
class Choice:
    threads: int
    reason: str

    def line(self) -> str:
        return f"dsv3: {self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.reason})"


def add_argument(p: argparse.ArgumentParser, dest: str = "threads") -> None:
    p.add_argument("--threads", dest=dest, type=int, default=None, metavar="N", help=HELP)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def read_loadavg(path: str = "/proc/loadavg") -> tuple[float, int]:
    """(1-minute load average, tasks runnable now) from /proc/loadavg ("0.52 0.58 0.59 3/611 12345")."""
    with open(path) as f:
        fields = f.read().split()
    return float(fields[0]), int(fields[3].split("/")[0])


def busy_cpus(siblings: int = 0, read: Callable[[], tuple[float, int]] = read_loadavg, samples: int = 5) -> float:
    """CPUs other work keeps busy (see the module docstring); `siblings`: this job's other processes
    on the machine, which are starting now and are not other work. 0 where /proc/loadavg is absent."""
    try:
        readings = []
        for i in range(samples):
            if i:
                time.sleep(0.01)
            readings.append(read())
    except OSError:
        return 0.0
    load = readings[0][0]
    running = statistics.median(r for _, r in readings) - 1  # this process reads it while running
    return max(0.0, max(load, running) - siblings)


def _from_env(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"${name}={value!r}: expected a whole number of threads >= 1")
    return n


_torch_default: Optional[int] = None


def torch_default() -> int:
    """torch's own count (one thread per physical core, or $OMP_NUM_THREADS), read before dsv3 sets one."""
    global _torch_default
    if _torch_default is None:
        import torch

        _torch_default = torch.get_num_threads()
    return _torch_default


def choose(requested: Optional[int] = None, local_ranks: Optional[int] = None, flag: str = "--threads",
           cpus: Optional[int] = None, busy: Optional[float] = None, cap: Optional[int] = None) -> Choice:
    """The thread count for one process of a job of `local_ranks` processes on this machine (default:
    $LOCAL_WORLD_SIZE, set by torchrun / `dsv3 launch`, else 1). `cpus` / `busy` replace the readings;
    `cap`: the most threads worth running (with the real readings: torch's default, so hyperthreads are
    not counted as cores)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"{flag} must be >= 1, got {requested}")
        return Choice(requested, flag)
    for name in (ENV, "OMP_NUM_THREADS"):
        n = _from_env(name)
        if n is not None:
            return Choice(n, f"${name}")
    local = local_ranks if local_ranks is not None else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if cpus is None:
        cpus, cap = cpu_count(), cap or torch_default()
    busy = busy_cpus(local - 1) if busy is None else busy
    free = max(1, cpus - round(busy))
    n = max(1, free // local)
    why = f"auto: {cpus} CPU{'s' if cpus != 1 else ''}, {busy:.1f} busy with other work"
    why += f", {free} shared by {local} processes" if local > 1 else ""
    if cap is not None and n > cap:
        n, why = cap, why + f", at most torch's default {cap}"
    return Choice(n, why)


_current: Optional[Choice] = None


def apply(choice: Choice) -> Choice:
    """Set torch's intra-op threads (and the inter-op pool, while it has not started yet)."""
    global _current
    import torch

    torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:  # the inter-op pool already ran work: torch allows setting it only once, before that
        pass
    _current = choice
    return choice


def setup(requested: Optional[int] = None, local_ranks: Optional[int] = None, flag: str = "--threads") -> Choice:
    """choose + apply, once per process for the same request (a verb and the engine it builds both ask)."""
    if _current is not None and requested is None and local_ranks is None:
        return _current
    return apply(choose(requested, local_ranks, flag))


def current() -> Optional[Choice]:
    """The count applied in this process (None: torch's default, nothing chose one)."""
    return _current


def announce(file=None) -> None:
    """Print the applied choice as one line on stderr (once the verb's input has been checked)."""
    if _current is not None:
        print(_current.line(), file=file or sys.stderr, flush=True)
