"""Per-worker entry used by `dsv3 launch` under torchrun:

    python -m dsv3.parallel.worker LOG_DIR VERB [ARGS...]     (or SCRIPT.py [ARGS...])

Sends this process's stdout and stderr to LOG_DIR/worker_{RANK}.log (RANK = global rank, msrun's
naming), then runs the dsv3 verb or the script.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    log_dir, cmd = Path(argv[0]), argv[1:]
    rank = os.environ.get("RANK", "0")
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir / f"worker_{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    if cmd[0].endswith(".py"):
        sys.argv = cmd
        runpy.run_path(cmd[0], run_name="__main__")
        return 0
    from dsv3.cli import main as cli_main

    return int(cli_main(cmd) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
