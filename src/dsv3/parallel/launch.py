"""`dsv3 launch`: start N worker processes on this node with torchrun, msrun-style.

The seed launches with MindSpore's
    bash scripts/msrun_launcher.sh "run_mindformer.py --config X.yaml" 1024 8 $master_ip 8118 $node_rank output/msrun_log False 7200
i.e. COMMAND, total workers, workers on this node, master address, master port, node rank, log
directory, join, cluster timeout (s). `dsv3 launch` takes the same positional arguments (or the
same as flags) and runs `torch.distributed.run` (torchrun) with them:

    dsv3 launch "train --config configs/train_tiny.yaml" 8 8 127.0.0.1 8118 0 output/msrun_log True 600

COMMAND is a dsv3 verb with its arguments, a Python script, or the seed's `run_mindformer.py
--config X` (run as `dsv3 train --config X`) or `run_predict_deepseek.py --config X --input T` (run as
`dsv3 generate --config X --input T`; rank 0's log has the output). Every worker writes stdout+stderr to
LOG_DIR/worker_{rank}.log (the global rank, as msrun; with pipeline parallelism the loss shows in
the last stage's log). With join False (msrun's default) the job runs in the background and the
command returns at once; with True it waits and returns the workers' exit status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from dsv3 import threads
from dsv3.errors import UserError

MSRUN_DEFAULTS = {"worker_num": 8, "local_worker_num": 8, "master_addr": "127.0.0.1", "master_port": 8118,
                  "node_rank": 0, "log_dir": "output/msrun_log", "join": False, "cluster_time_out": 7200}
POSITIONAL = list(MSRUN_DEFAULTS)


def _bool(v: str) -> bool:
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise UserError(f"join must be True or False, got {v!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", help='what each worker runs, quoted: "train --config X.yaml", "script.py args", '
                                   'or the seed\'s "run_mindformer.py --config X.yaml"')
    p.add_argument("msrun", nargs="*", metavar="ARG",
                   help="msrun_launcher.sh positional arguments: WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK "
                        "LOG_DIR JOIN CLUSTER_TIME_OUT (defaults 8 8 127.0.0.1 8118 0 output/msrun_log False 7200)")
    p.add_argument("--worker-num", type=int, help="total workers over all nodes")
    p.add_argument("--local-worker-num", type=int, help="workers on this node")
    p.add_argument("--master-addr", help="address of node 0")
    p.add_argument("--master-port", type=int, help="TCP port on node 0")
    p.add_argument("--node-rank", type=int, help="this node's index, 0 .. nodes-1")
    p.add_argument("--log-dir", help="directory for worker_{rank}.log")
    p.add_argument("--join", type=_bool, help="True: wait for the workers and return their status; False: run in the background")
    p.add_argument("--cluster-time-out", type=int, help="seconds to wait for all workers to join (process-group timeout)")


def resolve(args: argparse.Namespace) -> dict:
    """Merge positional (msrun order) and flag values over the msrun defaults, and validate."""
    if len(args.msrun) > len(POSITIONAL):
        raise UserError(f"too many positional arguments after COMMAND: {args.msrun}; expected at most {len(POSITIONAL)} "
                        f"({' '.join(n.upper() for n in POSITIONAL)})")
    conf = dict(MSRUN_DEFAULTS)
    for name, raw in zip(POSITIONAL, args.msrun):
        conf[name] = raw
    for name in POSITIONAL:
        if getattr(args, name, None) is not None:
            conf[name] = getattr(args, name)
    try:
        for name in ("worker_num", "local_worker_num", "master_port", "node_rank", "cluster_time_out"):
            conf[name] = int(conf[name])
    except ValueError:
        raise UserError(f"{name.upper()} must be an integer, got {conf[name]!r}") from None
    conf["join"] = _bool(conf["join"]) if not isinstance(conf["join"], bool) else conf["join"]
    n, local = conf["worker_num"], conf["local_worker_num"]
    if n < 1 or local < 1:
        raise UserError(f"WORKER_NUM ({n}) and LOCAL_WORKER ({local}) must be >= 1")
    if n % local:
        raise UserError(f"WORKER_NUM {n} is not a multiple of LOCAL_WORKER {local} (every node runs the same number of workers)")
    nodes = n // local
    if not 0 <= conf["node_rank"] < nodes:
        raise UserError(f"NODE_RANK {conf['node_rank']} must be in [0, {nodes - 1}] for {n} workers at {local} per node")
    if not 0 < conf["master_port"] < 65536:
        raise UserError(f"MASTER_PORT {conf['master_port']} is not a TCP port")
    conf["nodes"] = nodes
    return conf


def worker_command(command: str) -> list[str]:
    """The per-worker argv after `python -m dsv3.parallel.worker LOG_DIR`."""
    argv = shlex.split(command)
    if not argv:
        raise UserError("COMMAND is empty")
    if Path(argv[0]).name == "run_mindformer.py":  # the seed's entry point: only --config matters
        cfg = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
        cfg = cfg or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if cfg is None:
            raise UserError("run_mindformer.py needs --config PATH")
        return ["train", "--config", cfg]
    if Path(argv[0]).name == "run_predict_deepseek.py":  # the seed's inference entry: the same flags as dsv3 generate
        return ["generate", *argv[1:]]
    if argv[0].endswith(".py") and not Path(argv[0]).is_file():
        raise UserError(f"script {argv[0]} not found")
    return argv


def torchrun_argv(conf: dict, command: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(conf["nodes"]),
            "--nproc-per-node", str(conf["local_worker_num"]), "--node-rank", str(conf["node_rank"]),
            "--master-addr", str(conf["master_addr"]), "--master-port", str(conf["master_port"]),
            "-m", "dsv3.parallel.worker", str(conf["log_dir"]), *worker_command(command)]


def run(args: argparse.Namespace) -> int:
    conf = resolve(args)
    argv = torchrun_argv(conf, args.command)
    log_dir = Path(conf["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DSV3_DIST_TIMEOUT=str(conf["cluster_time_out"]))
    choice = threads.choose(local_ranks=conf["local_worker_num"])  # the free CPUs split over this node's workers
    env["OMP_NUM_THREADS"] = str(choice.threads)
    first = conf["node_rank"] * conf["local_worker_num"]
    logs = f"{log_dir}/worker_{first}.log .. worker_{first + conf['local_worker_num'] - 1}.log"
    launcher_log = open(log_dir / f"launcher_node{conf['node_rank']}.log", "ab")
    if not conf["join"]:
        proc = subprocess.Popen(argv, env=env, stdout=launcher_log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"started {conf['local_worker_num']} workers (node {conf['node_rank']} of {conf['nodes']}, pid {proc.pid}); logs: {logs}")
        return 0
    print(f"running {conf['local_worker_num']} workers (node {conf['node_rank']} of {conf['nodes']}; "
          f"{choice.line().removeprefix('dsv3: ')} each); logs: {logs}", flush=True)
    ranks = range(first, first + conf["local_worker_num"])
    starts = {r: (log_dir / f"worker_{r}.log").stat().st_size if (log_dir / f"worker_{r}.log").exists() else 0 for r in ranks}
    proc = subprocess.Popen(argv, env=env, stdout=launcher_log, stderr=subprocess.STDOUT)
    # Ctrl-C / SIGTERM reach torchrun, which stops every worker (none is left behind).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    rc = proc.wait()
    if rc:
        user_error = _user_error(log_dir, starts)
        if user_error:  # a bad argument or config, the same on every worker: its one line, exit 2 as the verb
            print(user_error, file=sys.stderr)
            return 2
        print(f"dsv3 launch: workers failed (exit {rc}); see {log_dir}/launcher_node{conf['node_rank']}.log and the worker logs",
              file=sys.stderr)
    return rc


def _user_error(log_dir: Path, starts: dict[int, int]) -> str | None:
    """The first worker's `dsv3 VERB: error: ...` line (a UserError) written by this run, if any."""
    for rank, start in starts.items():
        try:
            with open(log_dir / f"worker_{rank}.log", "rb") as f:
                f.seek(start)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        hit = next((ln for ln in reversed(lines) if ln.startswith("dsv3 ") and ": error: " in ln), None)
        if hit:
            return hit
    return None
