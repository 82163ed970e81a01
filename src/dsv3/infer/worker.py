"""The follower ranks of a spawned multi-process engine (`LLM(..., tensor_parallel_size=N)` on one machine).

Each follower is a fresh interpreter, `python -m dsv3.infer.worker RANK WORLD PORT PARENT_PID`, not
a multiprocessing child: multiprocessing's spawn re-imports the parent's `__main__`, so a plain
top-level script (no `if __name__ == "__main__":`) would run again in every worker and build its
own engine (Python's "start a new process before the current process has finished its
bootstrapping phase" error). A worker started here imports only dsv3 and never the user's script.

The `EngineSpec` arrives pickled on the worker's stdin, written by the process that started it (the
same trust as its command line: no file and no other process is involved; multiprocessing passes
its arguments the same way). A worker asks the kernel for SIGTERM when its parent dies, joins the
process group on 127.0.0.1:PORT and follows rank 0 (`dsv3.infer.distributed._join`).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from dsv3.errors import UserError


class Workers:
    """Rank 0's followers (ranks 1..N-1), and the watchdog that turns a death into a clean exit."""

    def __init__(self, spec, port: int, restore_threads: Optional[int] = None):
        import dsv3

        self.restore_threads = restore_threads  # rank 0's thread count before the engine (restored at shutdown)
        env = dict(os.environ)
        src = str(Path(dsv3.__file__).resolve().parents[1])  # the dsv3 this process runs, whatever its sys.path
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        payload = pickle.dumps(spec)
        world = spec.tensor_parallel_size
        self.procs: dict[int, subprocess.Popen] = {}
        for r in range(1, world):
            argv = [sys.executable, "-m", "dsv3.infer.worker", str(r), str(world), str(port), str(os.getpid())]
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env)
            self.procs[r] = p
            try:
                p.stdin.write(payload)
                p.stdin.close()
            except BrokenPipeError:  # it died at once: the watchdog reports its exit code
                pass
        self._stopping = threading.Event()
        self.started = False  # set once every rank built its engine

    def watch(self) -> None:
        threading.Thread(target=self._watch, name="dsv3-watchdog", daemon=True).start()

    def _dead(self) -> Optional[str]:
        """The line for a follower that exited (None while all run)."""
        for r, p in self.procs.items():
            code = p.poll()
            if code is None or (code == 2 and not self.started):  # 2 at start-up: an error rank 0 reports itself
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return f"dsv3: worker rank {r} (pid {p.pid}) {how}; shutting down"
        return None

    def _watch(self) -> None:
        from dsv3.infer.executor import fatal

        while not self._stopping.wait(0.2):
            line = self._dead()
            if line is not None and not self._stopping.is_set():
                self._terminate()
                fatal(line)

    def explain(self, message: str) -> None:
        """A collective failed: name the worker that died if one did (it may take a moment to be reaped)."""
        from dsv3.infer.executor import fatal

        for _ in range(20):
            line = self._dead()
            if line is not None:
                self._terminate()
                fatal(line)
            time.sleep(0.1)
        self._terminate()
        fatal(message)

    def _terminate(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the followers to exit (they were told to stop), then terminate and reap what is left."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._terminate()
        for p in self.procs.values():
            p.wait()


def main(argv: list[str]) -> None:
    """A follower: dies with its parent, joins the group, follows rank 0; exit 0 when rank 0 stops it,
    2 on a start-up error (rank 0 reports it)."""
    import torch.distributed as dist

    from dsv3.infer.distributed import _device_type, _join, set_rank_threads, timeout_s

    rank, world, port, parent = (int(a) for a in argv)
    try:  # SIGTERM when the parent (rank 0) dies, however it dies
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # it died before the request above
        os._exit(1)
    spec = pickle.loads(sys.stdin.buffer.read())
    set_rank_threads(spec, world)
    dist.init_process_group("nccl" if _device_type(spec) == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s()))
    try:
        _join(spec, rank, world, rank, None, None)
    except UserError:
        os._exit(2)
    except SystemExit as e:
        os._exit(int(e.code or 0))


if __name__ == "__main__":
    main(sys.argv[1:])
