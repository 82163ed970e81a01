"""`dsv3 preprocess` speed on the full WikiText-2 train split vs the `tokenizers` library itself.

    flock /tmp/dsv3-bench.lock python bench/bench_preprocess.py [--workers 2] [--data DIR] [--tokenizer PATH]

Both sides tokenise the same documents (WikiText cleaned and split into paragraphs, as the seed's
wikitext_to_bin.py does) on the same cores:
  reference  `tokenizers.Tokenizer.encode_batch(docs)` with RAYON_NUM_THREADS = workers (the
             library's own multi-threaded batch encode: the practical limit; it writes nothing)
  ours       `dsv3 preprocess` (library call) with `--workers N`, default stitch mode, seq 4096,
             no BOS (so both produce the same ids; checked), writing the .bin/.idx
Reported: tokens/s of each and their ratio (target >= 0.8), for the tokenise+write stage (ours minus
its input reading/cleaning, which is the same code for both) and for the whole run (reference =
load tokenizer + read/clean + encode_batch); also CPU seconds of each (all threads and worker
processes), which are less disturbed by other load on the machine than wall time. Best of
`--repeat` runs. Writes bench/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dsv3.bench.provenance import provenance  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process (all threads) plus its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=None, help="WikiText-2 folder (default: $DSV3_DATA_DIR, ../shared/data, or download)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json / dir / .json.xz (default: ../shared/data/deepseek_v3_tokenizer)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "preprocess.json"))
    args = ap.parse_args()
    # The reference's thread pool gets exactly the cores our workers get (must be set before import).
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)

    import numpy as np
    import tokenizers

    from dsv3.data.indexed_dataset import IndexedDataset
    from dsv3.data.preprocess import preprocess
    from dsv3.data.wikitext import find_wikitext, read_wikitext_documents

    shared = REPO.parent / "shared" / "data"
    data = find_wikitext(args.data if args.data else (shared / "wikitext-2" if shared.is_dir() else None))
    tok_path = args.tokenizer or str(shared / "deepseek_v3_tokenizer")
    train = data / "wiki.train.tokens"
    with tempfile.TemporaryDirectory() as tmp:
        if not train.is_file():  # decompress once, outside every timing
            plain = Path(tmp) / "wiki.train.tokens"
            with lzma.open(data / "wiki.train.tokens.xz", "rb") as f:
                plain.write_bytes(f.read())
            train = plain
        tok_json = Path(tmp) / "tokenizer.json"
        src = Path(tok_path)
        src = src / "tokenizer.json.xz" if (src / "tokenizer.json.xz").is_file() else (
            src / "tokenizer.json" if src.is_dir() else src)
        tok_json.write_bytes(lzma.open(src).read() if src.suffix == ".xz" else src.read_bytes())

        ref_best, ref_e2e_best, ours_best, ours_stage_best = float("inf"), float("inf"), None, float("inf")
        ref_cpu_best, ours_cpu_best = float("inf"), float("inf")
        for r in range(args.repeat):
            t0 = time.perf_counter()
            tok = tokenizers.Tokenizer.from_file(str(tok_json))
            docs = read_wikitext_documents(train)
            t1, c1 = time.perf_counter(), _cpu()
            enc = tok.encode_batch(docs, add_special_tokens=False)
            t2, c2 = time.perf_counter(), _cpu()
            ref_cpu_best = min(ref_cpu_best, c2 - c1)
            ref_best, ref_e2e_best = min(ref_best, t2 - t1), min(ref_e2e_best, t2 - t0)
            ref_tokens = sum(len(e.ids) for e in enc)
            if r == 0:
                ref_flat = np.concatenate([np.asarray(e.ids, np.int32) for e in enc])
            del enc

            c3 = _cpu()
            res = preprocess(train, f"{tmp}/wiki_{r}", str(tok_json), seq_length=4096, add_bos=False,
                             workers=args.workers, progress=False)
            ours_cpu_best = min(ours_cpu_best, _cpu() - c3)
            stage = res.seconds - res.read_seconds
            if ours_best is None or res.seconds < ours_best.seconds:
                ours_best = res
            ours_stage_best = min(ours_stage_best, stage)
            print(f"run {r}: reference encode_batch {t2 - t1:.2f}s (whole {t2 - t0:.2f}s); "
                  f"dsv3 preprocess {res.seconds:.2f}s (reading {res.read_seconds:.2f}s, tokenise+write {stage:.2f}s)",
                  file=sys.stderr)
        ds = IndexedDataset(ours_best.prefixes["text"])
        ours_flat = np.concatenate([ds[i] for i in range(len(ds))])
        n = len(ours_flat)
        input_bytes = train.stat().st_size
        ids_match = bool(ours_best.tokens == ref_tokens and np.array_equal(ours_flat, ref_flat[:n]))

    tokens = ref_tokens
    out = {
        "what": "dsv3 preprocess (stitch, seq 4096, no BOS) vs tokenizers encode_batch, full WikiText-2 train",
        "input_bytes": input_bytes,
        "documents": ours_best.documents,
        "tokens": tokens,
        "workers": args.workers,
        "reference_encode_batch_s": round(ref_best, 3),
        "reference_tokens_per_s": round(tokens / ref_best),
        "reference_whole_s": round(ref_e2e_best, 3),
        "ours_tokenise_write_s": round(ours_stage_best, 3),
        "ours_tokens_per_s": round(tokens / ours_stage_best),
        "ours_whole_s": round(ours_best.seconds, 3),
        "ours_read_clean_s": round(ours_best.read_seconds, 3),
        "ratio_tokenise_stage": round(ref_best / ours_stage_best, 3),
        "ratio_whole_run": round(ref_e2e_best / ours_best.seconds, 3),
        "reference_cpu_s_encode_batch": round(ref_cpu_best, 3),
        "ours_cpu_s_whole_run": round(ours_cpu_best, 3),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "target_ratio": 0.8,
        "ids_identical_to_tokenizers": ids_match,
        "sequences_written": ours_best.sequences["text"],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "command": "flock /tmp/dsv3-bench.lock python bench/bench_preprocess.py " + " ".join(sys.argv[1:]),
        "provenance": provenance(REPO),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if ids_match else 1


if __name__ == "__main__":
    sys.exit(main())
