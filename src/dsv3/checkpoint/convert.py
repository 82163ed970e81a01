"""`dsv3 convert`: stream a checkpoint from one layout to another on the CPU, shard by shard.

    dsv3 convert SRC DST                    # any supported layout -> HF hub layout, FP8 -> bf16
    dsv3 convert SRC DST --to dsv3          # -> our layout (stacked experts, model.mtp.k.*)
    dsv3 convert SRC DST --dtype float32    # output dtype of floating tensors (router bias stays fp32)
    dsv3 convert SRC DST --to fp8           # DeepSeek's FP8 format (128x128 block scales), MTP kept
    dsv3 convert SRC DST --quantize w8a8    # int8 weights per output channel (loads as W8A8)

SRC is a directory with config.json and safetensors in any layout `hf_map` reads: the hub's
per-expert names (FP8 with `weight_scale_inv` block scales, or bf16/fp32), transformers v5's fused
experts, or ours -- including a `dsv3 train` checkpoint (`OUTPUT/checkpoint/step-N`: model.safetensors
in our layout plus config.resolved.yaml, whose `model:` section becomes config.json), or the DCP directory a
`dsv3 launch` run writes there under any layout (`dcp_reader.DcpReader`; MTP kept). A training checkpoint
gets its run's tokenizer (data.tokenizer) with the chat template, as the run's own `hf/` export. FP8 weights
are dequantised with the pure-torch `fp8.weight_dequant`, needing no GPU and about one shard of
memory (plus, for `--to dsv3`, one layer's experts). It ends with one line: the tensors read and
written by dtype, the shards, bytes and seconds (`ConvertResult.describe`). config.json is rewritten consistently: `quantization_config` removed, `torch_dtype` set (transformers otherwise
still treats a dequantised checkpoint as FP8, `inference.md` §i-2). The output is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.dcp_reader import DcpReader, is_dcp_dir
from dsv3.checkpoint.io import check_checkpoint
from dsv3.checkpoint.load import KEEP_FP32, parse_dtype
from dsv3.checkpoint.reader import INDEX_NAME, SINGLE_NAME, TRAIN_CONFIG, CheckpointReader, load_dir_config, read_weight
from dsv3.checkpoint.save import _install, parse_size
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
"""Side files copied along (transformers/vLLM expect them next to the weights)."""


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if name.endswith(KEEP_FP32):
        return t.float()
    if not t.is_floating_point():
        return t
    return t if dtype is None else t.to(dtype)


def _source_dtype_default(reader: CheckpointReader) -> torch.dtype | None:
    """None keeps stored dtypes; an FP8 checkpoint has no dtype to keep, so its weights become bf16."""
    return torch.bfloat16 if any(d.startswith("F8") for _, _, d in reader.meta.values()) else None


def iter_hf(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of any readable layout, named and shaped as the HF hub layout (per-expert)."""
    for name in reader.names():
        tgt = hf_map.from_hf(name, cfg)
        if tgt is None:
            raise UserError(f"{reader.path}: tensor {name} is not part of a DeepSeek-V3 checkpoint with this config.json")
        if tgt.kind == "scale":
            continue
        t = read_weight(reader, name)
        if tgt.kind in ("expert", "tied"):
            yield name, _cast(name, t, dtype)
        elif tgt.kind == "gate_up":
            gate, up = t.chunk(2, dim=1)
            for ours, part in ((tgt.name, gate), (tgt.name.replace("gate_proj", "up_proj"), up)):
                for hf_name, e in hf_map.to_hf(ours, cfg):
                    yield hf_name, _cast(hf_name, part[e].clone(), dtype)
        else:
            for hf_name, e in hf_map.to_hf(tgt.name, cfg):
                yield hf_name, _cast(hf_name, t if e is None else t[e].clone(), dtype)
    if not any(hf_map.is_mtp_hf_name(n, cfg) for n in reader.meta):
        for hf_name, ours in hf_map.tied_copies(cfg):  # a dsv3-layout source has no MTP copies: write them
            if ours in reader.meta and any(n.startswith("model.mtp.") for n in reader.meta):
                yield hf_name, _cast(hf_name, read_weight(reader, ours), dtype)


def iter_dsv3(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of any readable layout, in our layout: experts stacked once all E have been read."""
    building: dict[str, list[torch.Tensor | None]] = {}
    for name in reader.names():
        tgt = hf_map.from_hf(name, cfg)
        if tgt is None:
            raise UserError(f"{reader.path}: tensor {name} is not part of a DeepSeek-V3 checkpoint with this config.json")
        if tgt.kind in ("scale", "tied"):
            continue
        t = _cast(tgt.name, read_weight(reader, name), dtype)
        if tgt.kind == "expert":
            slots = building.setdefault(tgt.name, [None] * cfg.n_routed_experts)
            slots[tgt.expert] = t
            if all(s is not None for s in slots):
                yield tgt.name, torch.stack(building.pop(tgt.name))
        elif tgt.kind == "gate_up":
            gate, up = t.chunk(2, dim=1)
            yield tgt.name, gate.contiguous()
            yield tgt.name.replace("gate_proj", "up_proj"), up.contiguous()
        else:
            yield tgt.name, t
    if building:
        raise UserError(f"{reader.path}: incomplete experts for {', '.join(sorted(building)[:4])}")


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `max_bytes` would be exceeded."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.files, self.weight_map, self.total = 0, [], {}, 0
        self.dtypes: Counter[str] = Counter()  # tensors written, by dtype

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        t = t.contiguous()
        if nbytes and self._overlaps(t):
            # safetensors refuses tensors sharing memory in one file: the hub layout's MTP copies of the
            # embedding/head come from the same source tensor, so each copy gets its own memory
            t = t.clone()
        self.pending[name] = t
        self.size += nbytes
        self.dtypes[str(t.dtype).removeprefix("torch.")] += 1

    def _overlaps(self, t: torch.Tensor) -> bool:
        """Whether `t`'s bytes overlap a pending tensor's (tied weights read twice share storage)."""
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(p.numel() and p.data_ptr() < hi and lo < p.data_ptr() + p.numel() * p.element_size()
                   for p in self.pending.values())

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.dir / fname), metadata={"format": "pt"})
        self.files.append(fname)
        for n in self.pending:
            self.weight_map[n] = fname
        self.total += self.size
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        """Rename parts to the HF shard names and write the index (none for a single file)."""
        self.flush()
        n = len(self.files)
        names = {f: (SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors") for i, f in enumerate(self.files, 1)}
        for old, new in names.items():
            (self.dir / old).rename(self.dir / new)
        if n > 1:
            wm = {k: names[v] for k, v in sorted(self.weight_map.items())}
            (self.dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": wm}, indent=2) + "\n")


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` read and wrote (`describe()`: the line `dsv3 convert` prints)."""

    src: Path
    dst: Path
    layout: str  # "hf", "dsv3", or the quantisation method
    source_dtypes: Counter  # tensors read, by safetensors dtype
    dtypes: Counter  # tensors written, by torch dtype
    shards: int
    bytes: int
    seconds: float

    def describe(self) -> str:
        def counts(c: Counter) -> str:
            return f"{sum(c.values()):,} tensors (" + ", ".join(f"{k} x {v:,}" for k, v in c.most_common()) + ")"

        div, unit = next(((d, u) for d, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if self.bytes >= d), (1, "bytes"))
        size = f"{self.bytes / div:.3g} {unit}"
        return (f"converted {self.src}: {counts(self.source_dtypes)} -> {self.dst} ({self.layout}): {counts(self.dtypes)}, "
                f"{self.shards} shard{'s' if self.shards != 1 else ''}, {size}, in {self.seconds:.1f} s")


def _run_tokenizer(src: Path) -> str | None:
    """The tokenizer a training checkpoint's run used (its config.resolved.yaml: data.tokenizer, or for
    fine-tuning init_from's), as `dsv3 train` exports it to RUN/hf; None (the default one) for other sources."""
    if (src / "config.json").is_file() or not (src / TRAIN_CONFIG).is_file():
        return None
    from dsv3.config.load import read_yaml
    from dsv3.config.train import run_config_from_dict
    from dsv3.data.sft_dataset import tokenizer_source

    cfg = run_config_from_dict(read_yaml(src / TRAIN_CONFIG), None, str(src / TRAIN_CONFIG))
    return tokenizer_source(cfg) if cfg.data.type == "sft" else cfg.data.tokenizer


def fix_config(hf: dict, dtype: torch.dtype | None, fallback: str) -> dict:
    """config.json for the converted weights: no quantization_config, the real storage dtype."""
    out = {k: v for k, v in hf.items() if k != "quantization_config"}
    name = str(dtype).replace("torch.", "") if dtype is not None else fallback
    out["torch_dtype"] = name
    if "dtype" in out:
        out["dtype"] = name
    return out


def quantize_stream(stream: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, method: str,
                    dtype: torch.dtype | None, scale_fmt: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-layout tensors (source precision) -> the quantised checkpoint format of `method` (`dsv3.quant.stored`):
    each selected matrix as its quantised weight plus `<name>_scale_inv`; the rest cast to `dtype`."""
    from dsv3.quant import QuantConfig
    from dsv3.quant.stored import convert_target, quantize_tensor

    qc = QuantConfig.preset(method)
    for name, t in stream:
        if convert_target(name, cfg, qc) is None:
            yield name, _cast(name, t, dtype)
        else:
            q, s = quantize_tensor(method, t, scale_fmt)
            yield name, q
            yield name + hf_map.SCALE_SUFFIX, s


def convert(src: str | Path, dst: str | Path, to: str = "hf", dtype: str | None = None, max_shard_size: str | int = "5GB",
            quantize: str | None = None, scale_fmt: str | None = None) -> ConvertResult:
    """Convert checkpoint directory `src` into `dst` (see the module docstring). Returns what was
    read and written (tensors by dtype, shards, bytes, time).

    to="fp8" (same as quantize="fp8"): DeepSeek's FP8 format (e4m3 weights, 128x128 block scales;
    embedding, lm_head, norms, router and MTP eh_proj kept, in bf16 unless `dtype`). quantize="w8a8" |
    "int8": int8 weights per output channel (`dsv3.quant.stored`), loadable by `dsv3.from_pretrained`.
    scale_fmt="ue8m0" (FP8 only): block scales rounded up to powers of two, as DeepSeek-V3.1 ships them."""
    if to == "fp8":
        if quantize not in (None, "fp8"):
            raise UserError(f"--to fp8 and --quantize {quantize} contradict each other")
        to, quantize = "hf", "fp8"
    if quantize is not None and to != "hf":
        raise UserError("--quantize writes the HF hub layout only (drop --to dsv3)")
    if scale_fmt is not None and quantize != "fp8":
        raise UserError(f"--scale-fmt {scale_fmt} applies to FP8 output only (add --to fp8)")
    if quantize is not None and quantize not in ("fp8", "w8a8", "int8"):
        raise UserError(f"--quantize {quantize!r}: expected fp8, w8a8 or int8 (int4 is applied at load: --quantization int4)")
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"output directory {dst} exists and is not empty")
    if src.resolve() == dst.resolve():
        raise UserError("source and destination are the same directory")
    reader = DcpReader(src) if is_dcp_dir(src) else CheckpointReader(src)
    with warnings.catch_warnings():  # a config declaring MTP without MTP weights converts as it is
        warnings.simplefilter("ignore")
        check_checkpoint(src, reader=reader)  # config ranges, layer count, names, shapes: refuse before writing
    cfg, hf = load_dir_config(src)
    out_dtype = parse_dtype(dtype) if dtype not in (None, "keep") else _source_dtype_default(reader)
    if quantize == "fp8" and dtype is None:
        out_dtype = torch.bfloat16  # the rest of a DeepSeek FP8 checkpoint is bf16
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        stream = iter_hf(reader, cfg, out_dtype) if to == "hf" else iter_dsv3(reader, cfg, out_dtype)
        if quantize is not None:
            stream = quantize_stream(iter_hf(reader, cfg, None), cfg, quantize, out_dtype, scale_fmt)
        for name, t in stream:
            writer.add(name, t)
        writer.finish()
        fallback = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
        conf = fix_config(hf, out_dtype, fallback)
        if quantize is not None:
            from dsv3.quant import QuantConfig
            from dsv3.quant.stored import stored_config

            conf["quantization_config"] = stored_config(quantize, QuantConfig.preset(quantize), scale_fmt)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        for f in COPY_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        if not (tmp / "tokenizer.json").is_file():  # e.g. a training checkpoint: the tokenizer every entry point would use
            from dsv3.data.tokenizer import export_tokenizer

            print(export_tokenizer(tmp, _run_tokenizer(src), cfg.vocab_size).replace(str(tmp), str(dst)), file=sys.stderr)
        _install(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return ConvertResult(src, dst, quantize or to, Counter(d for _, _, d in reader.meta.values()), writer.dtypes,
                         len(writer.files), writer.total, time.perf_counter() - t0)

