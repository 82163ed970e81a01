"""The single `dsv3 <verb>` command line.

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args) -> int | None`.
Only the chosen verb's module is imported (the vLLM pattern), so `dsv3 --help` stays fast and
never imports CUDA extensions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dsv3.errors import UserError

# verb -> (module, one-line help). A verb is listed only when its module exists.
VERBS: dict[str, tuple[str, str]] = {
    "info": ("dsv3.tools.info", "parameter and FLOP accounting of a model config (no allocation)"),
    "preprocess": ("dsv3.data.preprocess", "tokenise text into Megatron .bin/.idx files"),
    "train": ("dsv3.train.cli", "pretrain from a YAML config (ours or MindSpore-style)"),
    "plot": ("dsv3.train.plot", "plot loss curves and expert load of a training run"),
    "convert": ("dsv3.checkpoint.convert_cli", "convert checkpoints (HF <-> dsv3, FP8 -> BF16, train -> HF)"),
    "generate": ("dsv3.infer.cli", "generate text from a model (CLI, interactive chat)"),
    "serve": ("dsv3.serve.cli", "OpenAI-compatible REST server"),
    "score": ("dsv3.train.score_cli", "teacher-forced logprobs of prompt + completion pairs, equal to a --batch-invariant server's"),
    "bench": ("dsv3.bench.cli", "benchmarks: serve | throughput | latency"),
    "eval": ("dsv3.bench.eval_cli", "accuracy on C-Eval, MMLU, GSM8K, CLUEWSC through a server's OpenAI API"),
    "dryrun": ("dsv3.tools.dryrun", "per-rank memory of a parallel layout, from its real build (no devices, no data)"),
    "balance": ("dsv3.tools.balance", "plan pipeline stage sizes and recompute counts to fit device memory"),
    "launch": ("dsv3.parallel.launch", "multi-process / multi-node launcher (msrun-style arguments)"),
    "quickstart": ("dsv3.quickstart", "tiny pretraining on WikiText-2, then generation (the README's main job)"),
}
THREADED = ("train", "generate", "serve", "score", "bench", "convert", "quickstart")
"""Verbs that compute with torch on the CPU: they take --threads (bench on its throughput / latency runs)."""


def _available() -> dict[str, tuple[str, str]]:
    """Verbs whose module file exists, found without importing anything (`find_spec` of a submodule
    would import its parent packages, some of which import torch)."""
    root = Path(__file__).resolve().parent
    return {verb: (mod, help_) for verb, (mod, help_) in VERBS.items()
            if root.joinpath(*mod.split(".")[1:]).with_suffix(".py").is_file()}


def build_parser(verbs: dict[str, tuple[str, str]], only: str | None = None) -> argparse.ArgumentParser:
    from dsv3 import __version__, threads

    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch")
    parser.add_argument("--version", action="version", version=f"dsv3 {__version__}")
    threads.add_argument(parser, dest="threads_global")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb, (mod, help_) in verbs.items():
        p = sub.add_parser(verb, help=help_, description=help_)
        if verb == only:
            if verb in THREADED and verb != "bench":
                threads.add_argument(p)
            importlib.import_module(mod).add_arguments(p)
    return parser


def _threads(args: argparse.Namespace) -> None:
    """Apply the torch thread count before the verb runs (`dsv3.threads`); the verb logs it once its
    input is checked. An explicit count is exported as $DSV3_NUM_THREADS, so the processes a verb
    starts (tensor-parallel ranks, `dsv3 launch` workers) use it too."""
    from dsv3 import threads

    requested = getattr(args, "threads", None)
    requested = requested if requested is not None else args.threads_global
    if requested is not None:
        threads.choose(requested)  # a bad count is one line
        os.environ[threads.ENV] = str(requested)
    if args.verb in THREADED:
        threads.setup(requested)


def _verb_of(argv: list[str]) -> str | None:
    """The first word that is neither an option nor the value of the global `--threads N`."""
    words = iter(argv)
    for a in words:
        if a == "--threads":
            next(words, None)
        elif not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = _available()
    verb = _verb_of(argv)
    if verb is not None and verb not in verbs:
        print(f"dsv3: error: unknown verb {verb!r}; choose from {', '.join(verbs)}", file=sys.stderr)
        return 2
    parser = build_parser(verbs, only=verb)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    module = importlib.import_module(verbs[args.verb][0])
    try:
        _threads(args)
        rc = module.run(args)
    except UserError as e:
        print(f"dsv3 {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
