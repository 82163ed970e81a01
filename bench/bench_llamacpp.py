"""dsv3 against llama.cpp on the same weights, in one run: decode and prefill tokens/s, RSS beside each.

    flock /tmp/dsv3-bench.lock python bench/bench_llamacpp.py /tmp/dsv3-1b --threads 2
    flock /tmp/dsv3-bench.lock python bench/bench_llamacpp.py /tmp/dsv3-1b --llama-cpp ~/llama.cpp --out bench/results/llamacpp.json

The model: any HF-format DeepSeek-V3 directory, e.g. the seed 1B config with random weights from
`python bench/make_random_model.py --config configs/deepseek_v3_1b.yaml --out /tmp/dsv3-1b`. Its
config.json must carry `scoring_func` and `topk_method` (dsv3's export writes them; without them
llama.cpp's converter silently routes with softmax).

dsv3: `LLM(dir, quantization=...)`, batch 1, a --prompt-len token prompt (128), --new-tokens greedy
tokens (32), --threads torch threads: fp32, int8 and int4 (fp32 model), W8A8 as the seed's predict
YAML runs it (bfloat16 model: the dense lm_head and kv_b_proj in bf16), and FP8 when the directory
stores FP8 weights. Each measurement runs in a fresh process (its peak RSS is its own) after one
burn-in generation: prefill tok/s = prompt tokens / time of the prefill step, decode tok/s = decode
tokens / time of the decode steps.

llama.cpp: `llama-bench -p 128 -n 32 -t T -r 3 -o json` on F32 / Q8_0 / Q4_K_M GGUFs converted from
the same directory by llama.cpp's own convert_hf_to_gguf.py and llama-quantize (cached in --gguf-dir,
keyed by a digest of the directory's files). Where llama.cpp is: --llama-cpp DIR (a checkout with
build/bin/llama-bench and llama-quantize), else the `build` verb of --anchor SCRIPT (default:
../shared/tools/llamacpp-anchor.sh beside the repository, if there; it builds once, natively for the
machine, 8-16 min).

--repeats rounds, interleaved (every dsv3 mode, then every GGUF, per round), so a shared machine's
drift hits all alike; each figure is given as min / median / max over the rounds, with the peak RSS
of the process that produced it. Writes bench/results/llamacpp.json (with `provenance`: command,
commit, load, CPU model and ISA flags, torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = REPO.parent / "shared" / "tools" / "llamacpp-anchor.sh"


@dataclass(frozen=True)
class Mode:
    name: str
    column: str  # the issue table's column
    quantization: str | None
    dtype: str
    gguf: str | None  # llama.cpp's file of equal bits (model-<gguf>.gguf), None: no counterpart


MODES = (
    Mode("fp32", "fp32 / F32", "none", "float32", "f32"),  # "none": an FP8 directory is dequantised
    Mode("int8", "int8 / Q8_0", "int8", "float32", "q8_0"),
    Mode("int4", "int4 / Q4_K_M", "int4", "float32", "q4_k_m"),
    Mode("w8a8", "W8A8 (seed)", "w8a8", "bfloat16", None),
    Mode("fp8", "FP8 (checkpoint)", None, "float32", None),  # only for a directory that stores FP8
)
GGUF_TYPES = {"f32": None, "q8_0": None, "q4_k_m": "Q4_K_M"}  # converter outtype, or llama-quantize type from f32


class BenchError(Exception):
    """A one-line user error (bad directory, missing llama.cpp, a failed tool)."""


# ------------------------------------------------------------------------------------------ processes
def run_measured(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str, float]:
    """Run cmd; (exit code, stdout, stderr, peak RSS MB of that process alone, from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        text = [f.read().decode("utf-8", "replace") for f in (out, err)]  # llama.cpp's logs are not always UTF-8
        return proc.returncode, text[0], text[1], round(usage.ru_maxrss / 1024, 1)


def child(model_dir: str, mode: Mode, threads: int, prompt_len: int, new_tokens: int) -> dict:
    """One dsv3 measurement in this process (the parent starts it with --child)."""
    import torch

    from dsv3 import LLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # no prefix caching: every timed prefill computes the whole prompt
    llm = LLM(model_dir, quantization=mode.quantization, dtype=mode.dtype, max_num_seqs=1, enable_prefix_caching=False,
              max_model_len=prompt_len + new_tokens + 8, num_gpu_blocks=(prompt_len + new_tokens) // 16 + 2)
    engine, load_s = llm.engine, time.perf_counter() - t0
    vocab = engine.model_config.vocab_size
    prompt = torch.randint(2, min(vocab, 100_000), (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    timed(engine, prompt[::-1], 4)  # burn-in
    r = timed(engine, prompt, new_tokens)
    if r["prefill_tokens"] != prompt_len or r["decode_tokens"] != new_tokens - 1:
        raise RuntimeError(f"timed {r['prefill_tokens']} prefill / {r['decode_tokens']} decode tokens, "
                           f"expected {prompt_len} / {new_tokens - 1}")
    report = getattr(engine, "quant_report", None)
    return {**r, "load_s": round(load_s, 2), "quantization_report": report.summary() if report is not None else None}


def timed(engine, prompt: list[int], new: int) -> dict:
    """Greedy generation of `new` tokens; the prefill step's and the decode steps' time and tokens."""
    from dsv3.infer.sampling import SamplingParams

    engine.add_request(f"r{time.perf_counter_ns()}", None, prompt, SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new))
    spent = {"prefill": [0.0, 0], "decode": [0.0, 0]}
    while engine.has_unfinished_requests():
        before = engine.stats()
        t = time.perf_counter()
        engine.step()
        dt, after = time.perf_counter() - t, engine.stats()
        for kind in spent:
            n = after[f"{kind}_tokens"] - before[f"{kind}_tokens"]
            if n:
                spent[kind][0] += dt
                spent[kind][1] += n
                break
    (tp, npre), (td, ndec) = spent["prefill"], spent["decode"]
    return {"prefill_tok_s": npre / tp, "decode_tok_s": ndec / td, "prefill_tokens": npre, "decode_tokens": ndec}


def measure_dsv3(args, mode: Mode) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), args.model_dir, "--child", mode.name, "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    rc, out, err, rss = run_measured(cmd, args.timeout)
    if rc != 0 or not out.strip():
        raise BenchError(f"dsv3 {mode.name} failed (exit {rc}): {(err.strip().splitlines() or ['no output'])[-1]}")
    return {**json.loads(out.strip().splitlines()[-1]), "rss_peak_mb": rss}


def measure_llama(args, binary: Path, gguf: Path) -> dict:
    cmd = [str(binary), "-m", str(gguf), "-p", str(args.prompt_len), "-n", str(args.new_tokens), "-t", str(args.threads),
           "-r", str(args.llama_reps), "-o", "json"]
    rc, out, err, rss = run_measured(cmd, args.timeout)
    if rc != 0:
        raise BenchError(f"{' '.join(cmd)} failed (exit {rc}): {(err.strip().splitlines() or ['no output'])[-1]}")
    return {**parse_llama_bench(out, args.prompt_len, args.new_tokens), "rss_peak_mb": rss}


def parse_llama_bench(text: str, prompt_len: int, new_tokens: int) -> dict:
    """llama-bench's `-o json` array -> prefill / decode tok/s (its average over -r repetitions)."""
    try:
        rows = json.loads(text)
        pp = next(r for r in rows if r["n_prompt"] == prompt_len and r["n_gen"] == 0)
        tg = next(r for r in rows if r["n_gen"] == new_tokens and r["n_prompt"] == 0)
    except (ValueError, TypeError, KeyError, StopIteration):
        raise BenchError(f"llama-bench printed no pp{prompt_len} and tg{new_tokens} results in JSON: {text[:200]!r}") from None
    return {"prefill_tok_s": float(pp["avg_ts"]), "decode_tok_s": float(tg["avg_ts"]),
            "build_commit": tg.get("build_commit"), "cpu_info": tg.get("cpu_info"), "model_type": tg.get("model_type")}


# ------------------------------------------------------------------------------------------ llama.cpp
def find_llama_cpp(args) -> Path:
    """The llama.cpp directory: --llama-cpp, else what the anchor script's `build` verb prints."""
    if args.llama_cpp:
        d = Path(args.llama_cpp).expanduser()
    else:
        anchor = Path(args.anchor).expanduser() if args.anchor else DEFAULT_ANCHOR
        if not anchor.is_file():
            raise BenchError(f"llama.cpp: give --llama-cpp DIR (a built checkout) or --anchor SCRIPT "
                             f"(llamacpp-anchor.sh); {anchor} does not exist")
        print(f"llama.cpp from {anchor} build (builds once for this machine if not built: 8-16 min)", flush=True)
        p = subprocess.run(["bash", str(anchor), "build"], capture_output=True, text=True, errors="replace")
        if p.returncode != 0 or not p.stdout.strip():
            raise BenchError(f"{anchor} build failed (exit {p.returncode}): {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
        d = Path(p.stdout.strip().splitlines()[-1])
    for tool in ("llama-bench", "llama-quantize"):
        if not (d / "build" / "bin" / tool).is_file():
            raise BenchError(f"{d}: no build/bin/{tool} (build llama.cpp with its llama-bench and llama-quantize targets)")
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise BenchError(f"{d}: no convert_hf_to_gguf.py (not a llama.cpp checkout)")
    return d


def dir_digest(model_dir: Path) -> str:
    """sha256 over the resolved path and the name, size and mtime of every config / weight file."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def convert(llama: Path, model_dir: Path, gguf_dir: Path, wanted: list[str]) -> dict[str, Path]:
    """model-<type>.gguf for each wanted type (F32 / Q8_0 by the converter, Q4_K_M quantised from F32),
    written under a temporary name then renamed; existing files are reused."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for t in ["f32"] + [t for t in wanted if t != "f32"]:  # Q4_K_M is made from the F32 file
        path = gguf_dir / f"model-{t}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".gguf.tmp")
            if GGUF_TYPES[t] is None:
                cmd = [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(tmp), "--outtype", t]
            else:
                cmd = [str(llama / "build" / "bin" / "llama-quantize"), str(out["f32"]), str(tmp), GGUF_TYPES[t]]
            print(f"converting to {path.name}", flush=True)
            env = {**os.environ, "PYTHONPATH": str(llama / "gguf-py")}
            p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
            (gguf_dir / f"convert-{t}.log").write_text(p.stdout + p.stderr)
            if p.returncode != 0 or not tmp.is_file():
                raise BenchError(f"{' '.join(cmd[:2])} ... failed (exit {p.returncode}); log: {gguf_dir / f'convert-{t}.log'}")
            tmp.replace(path)
        out[t] = path
    return {t: out[t] for t in wanted}


# ------------------------------------------------------------------------------------------ the table
def spread(xs: list[float]) -> dict:
    return {"min": round(min(xs), 2), "median": round(statistics.median(xs), 2), "max": round(max(xs), 2),
            "runs": [round(x, 2) for x in xs]}


def side(runs: list[dict]) -> dict:
    """Figures of one engine and format over the rounds (tok/s and the RSS of each run)."""
    out = {k: spread([r[k] for r in runs]) for k in ("decode_tok_s", "prefill_tok_s", "rss_peak_mb")}
    for k in ("quantization_report", "build_commit", "cpu_info", "model_type"):
        if runs[0].get(k) is not None:
            out[k] = runs[0][k]
    return out


def assemble(modes: list[Mode], rounds: list[dict], gguf: dict[str, Path]) -> dict:
    """The issue's table: per column, dsv3 and llama.cpp side by side, and the median ratios."""
    table = {}
    for m in modes:
        ours = side([r["dsv3"][m.name] for r in rounds])
        row = {"dsv3": {"quantization": m.quantization or "as stored", "dtype": m.dtype, **ours}}
        if m.gguf is not None and m.gguf in gguf:
            theirs = side([r["llama_cpp"][m.gguf] for r in rounds])
            row["llama_cpp"] = {"file": gguf[m.gguf].name, **theirs}
            for k in ("decode_tok_s", "prefill_tok_s"):
                row[f"{k.split('_')[0]}_dsv3_over_llama_cpp"] = round(ours[k]["median"] / theirs[k]["median"], 3)
        table[m.column] = row
    by_name = {m.name: table[m.column] for m in modes}
    if "w8a8" in by_name and "fp32" in by_name:
        w, f = by_name["w8a8"]["dsv3"], by_name["fp32"]["dsv3"]
        by_name["w8a8"]["decode_over_dsv3_fp32"] = round(w["decode_tok_s"]["median"] / f["decode_tok_s"]["median"], 3)
    if "w8a8" in by_name and "llama_cpp" in by_name.get("int8", {}):
        q8 = by_name["int8"]["llama_cpp"]["prefill_tok_s"]["median"]
        by_name["w8a8"]["prefill_over_llama_cpp_q8_0"] = round(by_name["w8a8"]["dsv3"]["prefill_tok_s"]["median"] / q8, 3)
    return table


def has_fp8(model_dir: Path) -> bool:
    qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "fp8"


def check_model_dir(model_dir: Path) -> None:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise BenchError(f"{model_dir}: no config.json (give an HF-format DeepSeek-V3 directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise BenchError(f"{cfg_path}: not JSON ({e})") from None
    missing = [k for k in ("scoring_func", "topk_method") if k not in cfg]
    if missing:
        raise BenchError(f"{cfg_path}: no {' / '.join(missing)} (llama.cpp's converter would route with softmax); "
                         "export the directory with dsv3 (save_pretrained / dsv3 convert)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="HF-format DeepSeek-V3 directory (the same weights for both engines)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (each figure: min / median / max)")
    ap.add_argument("--llama-reps", type=int, default=3, help="llama-bench -r (its own repetitions, averaged)")
    ap.add_argument("--modes", default=",".join(m.name for m in MODES), help="dsv3 modes (fp8 only where the directory stores FP8)")
    ap.add_argument("--llama-cpp", help="llama.cpp directory with build/bin/llama-bench, llama-quantize, convert_hf_to_gguf.py")
    ap.add_argument("--anchor", help=f"llamacpp-anchor.sh whose `build` verb gives the llama.cpp directory (default {DEFAULT_ANCHOR})")
    ap.add_argument("--no-llama-cpp", action="store_true", help="dsv3 only")
    ap.add_argument("--gguf-dir", help="GGUF cache (default: the temp directory, keyed by a digest of model_dir)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measured process")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "llamacpp.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k in ("threads", "prompt_len", "new_tokens", "repeats", "llama_reps"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    known = {m.name for m in MODES}
    args.mode_names = [n.strip() for n in args.modes.split(",") if n.strip()]
    bad = [n for n in args.mode_names if n not in known]
    if bad or not args.mode_names:
        ap.error(f"--modes: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(sorted(known))}")
    return args


def run(args) -> dict:
    model_dir = Path(args.model_dir).expanduser()
    check_model_dir(model_dir)
    modes = [m for m in MODES if m.name in args.mode_names and (m.name != "fp8" or has_fp8(model_dir))]
    binary, gguf = None, {}
    if not args.no_llama_cpp:
        llama = find_llama_cpp(args)
        binary = llama / "build" / "bin" / "llama-bench"
        gguf_dir = Path(args.gguf_dir) if args.gguf_dir else Path(tempfile.gettempdir()) / f"dsv3-gguf-{dir_digest(model_dir)}"
        gguf = convert(llama, model_dir, gguf_dir, [m.gguf for m in modes if m.gguf])
    rounds = []
    for i in range(args.repeats):
        r = {"dsv3": {}, "llama_cpp": {}}
        for m in modes:
            r["dsv3"][m.name] = measure_dsv3(args, m)
            print(f"round {i} dsv3 {m.name}: {json.dumps({k: r['dsv3'][m.name][k] for k in ('decode_tok_s', 'prefill_tok_s', 'rss_peak_mb')})}", flush=True)
        for t, path in gguf.items():
            r["llama_cpp"][t] = measure_llama(args, binary, path)
            print(f"round {i} llama.cpp {path.name}: {json.dumps({k: r['llama_cpp'][t][k] for k in ('decode_tok_s', 'prefill_tok_s', 'rss_peak_mb')})}", flush=True)
        rounds.append(r)
    from dsv3.bench.provenance import provenance

    return {"bench": "llamacpp", "model_dir": str(model_dir), "threads": args.threads, "batch": 1, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "llama_bench_reps": args.llama_reps,
            "llama_bench": str(binary) if binary else None, "table": assemble(modes, rounds, gguf), "rounds": rounds,
            "provenance": provenance(REPO)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model_dir, next(m for m in MODES if m.name == args.child), args.threads,
                               args.prompt_len, args.new_tokens)))
        return 0
    try:
        result = run(args)
    except BenchError as e:
        print(f"bench_llamacpp: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result["table"], indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
