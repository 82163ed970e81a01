"""Write Hugging Face format checkpoints (config.json + sharded safetensors).

`save_pretrained(model, path, max_shard_size=)` writes the hub layout (per-expert tensors, MTP as
layer `num_hidden_layers + k` with copies of the tied embedding/head) into a temporary directory
that is then renamed into place. All names go through `dsv3.checkpoint.hf_map`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.reader import INDEX_NAME, SINGLE_NAME
from dsv3.config.hf import to_hf_dict
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError


def parse_size(size: int | str) -> int:
    """'5GB' (10^9), '5GiB' (2^30), '200MB', '50KB' or an int -> bytes (HF conventions)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise UserError(f"max_shard_size {size!r}: expected a byte count like 5GB, 500MB or 2GiB")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)



def hf_tensors(model: nn.Module, mtp_copies: bool = True) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(HF name, tensor view, bytes) for every tensor of the hub layout, in state-dict order.

    Expert slices and tied copies are views; callers copy them only when writing their shard.
    """
    cfg: ModelConfig = model.config
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for name, t in sd.items():
        for hf_name, e in hf_map.to_hf(name, cfg):
            v = t if e is None else t[e]
            yield hf_name, v, v.numel() * v.element_size()
    for hf_name, ours in hf_map.tied_copies(cfg) if mtp_copies else ():
        t = sd.get(ours, sd.get("model.embed_tokens.weight"))
        yield hf_name, t, t.numel() * t.element_size()
    for hf_name, shape in hf_map.hf_only_empty(cfg):
        t = torch.empty(shape, dtype=sd["model.embed_tokens.weight"].dtype)
        yield hf_name, t, 0


def _plan_shards(items: list[tuple[str, torch.Tensor, int]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards, cur, size = [], [], 0
    for name, t, nbytes in items:
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _install(tmp: Path, dest: Path) -> None:
    """Move a fully written temporary directory into place (whole-dir rename when possible)."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a directory")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp (and safetensors) make 0700/0600: give the user's usual modes
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)
    if not dest.exists() or not any(dest.iterdir()):
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        return
    # Existing directory (may hold tokenizer files): replace our files, weights first, index/config last.
    new = {p.name for p in tmp.iterdir()}
    for old in dest.glob("model*.safetensors"):
        if old.name not in new:
            old.unlink()
    if INDEX_NAME not in new and (dest / INDEX_NAME).exists():
        (dest / INDEX_NAME).unlink()
    for name in sorted(new, key=lambda n: n in (INDEX_NAME, "config.json")):
        os.replace(tmp / name, dest / name)
    tmp.rmdir()


SIDE_FILES = ("tokenizer.json", "tokenizer.json.xz", "tokenizer_config.json", "special_tokens_map.json",
                        "generation_config.json")
"""Files `tokenizer="auto"` copies from the directory the model was loaded from."""


def _write_tokenizer(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """The tokenizer files of an HF directory being written (see `save_pretrained`)."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, str) and tokenizer == "auto":
        src = getattr(model, "name_or_path", None)
        for name in SIDE_FILES if src is not None else ():
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, directory / name)
        return
    from dsv3.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if isinstance(tok, Tokenizer):
        save_tokenizer(tok, directory)
    elif callable(getattr(tok, "save_pretrained", None)):  # a transformers tokenizer
        tok.save_pretrained(str(directory))
    else:
        raise TypeError(f"tokenizer must be 'auto', None, a path, a dsv3 Tokenizer or have save_pretrained(); got {type(tok).__name__}")


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB", mtp_copies: bool = True,
                    tokenizer: Any = "auto") -> Path:
    """Write `model` as an HF-format directory (config.json, safetensors shards, index, tokenizer).

    Tensors keep their dtypes (the router bias stays fp32). `mtp_copies` writes the MTP layer's
    copies of the embedding and head that the hub format carries. `tokenizer`: "auto" copies the
    tokenizer files of the directory the model was loaded from (`from_pretrained` records it as
    `model.name_or_path`; a model built in Python has none, so none is written); a path or a
    tokenizer object (`dsv3.data.tokenizer.Tokenizer`, or one with `save_pretrained`, e.g.
    transformers') writes that one, as `dsv3 train`'s export does; None writes no tokenizer.
    Everything is written to a temporary directory first. Returns the directory.
    """
    from safetensors.torch import save_file

    if getattr(model, "quantization", None) is not None:
        raise UserError("saving a quantised model is not supported: save the dense model and write a quantised "
                        "checkpoint with `dsv3 convert SRC DST --to fp8` or `--quantize w8a8|int8`")
    dest = Path(path)
    max_bytes = parse_size(max_shard_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(list(hf_tensors(model, mtp_copies)), max_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = SINGLE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            # clone: expert slices and tied copies share storage, which safetensors refuses
            tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in shard}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        cfg = model.config
        dtype = str(model.lm_head.weight.dtype).replace("torch.", "")
        hf = to_hf_dict(dataclasses.replace(cfg, torch_dtype=dtype))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        _write_tokenizer(model, tokenizer, tmp)
        _install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
