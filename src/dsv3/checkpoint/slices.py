"""Read only the slices a rank owns, straight from the safetensors shards.

A rank's parameter is a box of the single-process tensor: a plain tensor (the whole box), a
DTensor shard (FSDP / TP `Shard(dim)` / `Replicate` on its mesh, EP's `Shard(0)` of the stacked
experts) or a pipeline stage's parameter (a stage holds only its layers' parameters). For each
box, `SliceReader.read` fetches exactly those elements with `safe_open(...).get_slice(name)[box]`:
never the full tensor of a parameter the rank keeps a shard of.

How our tensors lie in a checkpoint comes from the one name table (`dsv3.checkpoint.hf_map`):
* a tensor stored under one name (HF, or a `dsv3 train` model.safetensors in our own names): the
  box is read as is;
* stacked routed experts [E, I, D] stored one tensor per expert (the hub layout): only the
  owned experts' tensors are opened, each sliced by the box's other dims;
* transformers v5's fused `gate_up_proj` [E, 2I, D]: gate rows are its first I rows, up rows the
  next I (the box is shifted);
* FP8 block-quantised weights (`float8_e4m3fn` + `weight_scale_inv` [ceil(M/128), ceil(N/128)]):
  the box of the weight and only the scale blocks it touches are read, then dequantised
  `W = Wq · S[i//128, j//128]` (int8 per-row scales of `dsv3 convert --quantize`: the box's rows).

API:
    reader = SliceReader(path_or_CheckpointReader, cfg, skip_mtp_layers=0)
    reader.read(our_name, box, raw=False) -> fp32 tensor of the box (tuple of slices, global
        coordinates); raw=True: as stored (FP8 stays FP8; its scales are `<our_name>_scale_inv`)
    reader.read_into(out, our_name, box) -> the same copied into `out` (experts one at a time)
    fill_module(module, reader) -> names filled: every parameter and persistent buffer of `module`
        (a Transformer, a pipeline stage, any parallelism applied, materialised) gets its local box
    reader.bytes_read / reader.reads: what was read (for accounting and tests); reader.close()
The names and shapes are checked against the model beforehand from the file headers alone
(`dsv3.checkpoint.load.load_checkpoint_into(..., dry_run=True)` on the meta model); `fill_module`
still reports, in one line, any tensor it finds no source for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.fp8 import BLOCK
from dsv3.checkpoint.reader import CheckpointReader, _few
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

Box = tuple[slice, ...]
QUANTISED = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
"""Storage dtypes of modules kept quantised (`dsv3.quant`): filled with the stored values and scales."""


def _norm_box(box: Box, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Slices -> (start, stop) pairs clipped to `shape` (step 1 only)."""
    out = []
    for s, n in zip(box, shape):
        if s.step not in (None, 1):
            raise ValueError(f"slice step {s.step} not supported")
        a, b, _ = s.indices(n)
        out.append((a, max(a, b)))
    out += [(0, n) for n in shape[len(box):]]
    return tuple(out)


def _slices(bounds) -> Box:
    return tuple(slice(a, b) for a, b in bounds)


class SliceReader:
    """Our state-dict names -> where they lie in a checkpoint directory; reads boxes of them.

    `source`: an open `CheckpointReader` (kept open by the caller) or a directory path (opened and
    validated here; `close()` releases it). `skip_mtp_layers`: MTP layers the files hold that the
    model was built without (their tensors are ignored).
    """

    def __init__(self, source: str | Path | CheckpointReader, cfg: ModelConfig, skip_mtp_layers: int = 0):
        self._own = not isinstance(source, CheckpointReader)
        self.files = CheckpointReader(source) if self._own else source
        self.cfg = cfg
        self.bytes_read = 0
        self.reads: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # (stored name, box shape, stored shape)
        n = cfg.num_hidden_layers
        skip = tuple(f"model.layers.{n + k}." for k in range(skip_mtp_layers)) + tuple(f"model.mtp.{k}." for k in range(skip_mtp_layers))
        # our name -> ("tensor", hf) | ("expert", {e: hf}) | ("fused", hf, half)
        self.sources: dict[str, tuple] = {}
        for name in self.files.names():
            if (skip and name.startswith(skip)) or 0 in self.files.shape(name):
                continue
            tgt = hf_map.from_hf(name, cfg)
            if tgt is not None and tgt.kind == "scale":  # for modules kept quantised: `<our weight>_scale_inv`
                tgt = hf_map.from_hf(tgt.name, cfg)
                if tgt is None or tgt.kind not in ("tensor", "expert"):
                    continue
                tgt = hf_map.Target(tgt.name + hf_map.SCALE_SUFFIX, tgt.kind, tgt.expert)
            if tgt is None or tgt.kind == "tied":
                continue
            if tgt.kind == "tensor":
                self.sources[tgt.name] = ("tensor", name)
            elif tgt.kind == "expert":
                self.sources.setdefault(tgt.name, ("expert", {}))[1][tgt.expert] = name
            elif tgt.kind == "gate_up":
                self.sources[tgt.name] = ("fused", name, 0)
                self.sources[tgt.name.replace("gate_proj", "up_proj")] = ("fused", name, 1)

    @property
    def path(self) -> Path:
        return self.files.path

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def close(self) -> None:
        """Release the files if this reader opened them."""
        if self._own:
            self.files.close()

    # ---- reading
    def read(self, name: str, box: Box, raw: bool = False) -> torch.Tensor:
        """The box `box` (global coordinates of our tensor `name`) as fp32, dequantised if stored FP8/int8;
        `raw`: as stored (a quantised weight stays quantised; its scales are `<name>_scale_inv`)."""
        src = self.sources[name]
        if src[0] == "tensor":
            return self._read_stored(src[1], box, raw)
        if src[0] == "fused":  # [E, 2I, D]: rows [half*I, half*I + I) are ours
            stored = self.files.shape(src[1])
            inter = stored[1] // 2
            (e0, e1), (r0, r1), *rest = _norm_box(box, (stored[0], inter, *stored[2:]))
            off = src[2] * inter
            return self._read_stored(src[1], (slice(e0, e1), slice(off + r0, off + r1), *_slices(rest)), raw)
        experts, (e0, e1) = self._experts(name, box)
        rows = [self._read_stored(experts[e], box[1:], raw) for e in range(e0, e1)]
        if rows:
            return torch.stack(rows)
        inner = self.files.shape(next(iter(experts.values())))
        return torch.empty((0, *(b - a for a, b in _norm_box(box[1:], inner))), dtype=torch.float32)

    def read_into(self, out: torch.Tensor, name: str, box: Box, raw: bool = False) -> None:
        """`out.copy_(read(name, box, raw))`, stacked experts one expert at a time (the transient is one
        expert's box, not the whole local stack)."""
        if self.sources[name][0] != "expert":
            out.copy_(self.read(name, box, raw))
            return
        experts, (e0, e1) = self._experts(name, box)
        for i, e in enumerate(range(e0, e1)):
            out[i].copy_(self._read_stored(experts[e], box[1:], raw))

    def _experts(self, name: str, box: Box) -> tuple[dict[int, str], tuple[int, int]]:
        """(expert -> stored name, the box's expert range) of a stacked tensor; every expert of the range must be stored."""
        experts = self.sources[name][1]
        e0, e1 = _norm_box(box[:1], (self.cfg.n_routed_experts,))[0]
        absent = [e for e in range(e0, e1) if e not in experts]
        if absent:
            raise UserError(f"{self.path}: missing tensors: {name} (experts {absent[:8]} missing)")
        return experts, (e0, e1)

    def _get(self, stored: str, bounds) -> torch.Tensor:
        """The box of the stored tensor, read through `get_slice` (and counted)."""
        shape = tuple(b - a for a, b in bounds)
        if 0 in shape:
            return torch.empty(shape, dtype=torch.float32)
        fname, full, _ = self.files.meta[stored]
        t = self.files._handles[fname].get_slice(stored)[_slices(bounds)]
        self.bytes_read += t.numel() * t.element_size()
        self.reads.append((stored, shape, full))
        return t

    def _read_stored(self, stored: str, box: Box, raw: bool = False) -> torch.Tensor:
        bounds = _norm_box(box, self.files.shape(stored))
        t = self._get(stored, bounds)
        if raw:
            return t
        quant = self.files.meta[stored][2] in ("F8_E4M3", "F8_E5M2", "I8")
        if not quant or t.numel() == 0:
            return t.float()
        sname = stored + hf_map.SCALE_SUFFIX
        if sname not in self.files.meta:
            raise UserError(f"{self.path}: quantised tensor {stored} ({self.files.meta[stored][2]}) has no {sname}")
        sshape = self.files.shape(sname)
        if t.dtype == torch.int8:  # one scale per output row
            s = self._get(sname, (bounds[0], *((0, n) for n in sshape[1:])))
            return t.float() * s.float().reshape(t.shape[0], *([1] * (t.ndim - 1)))
        return dequant_box(t, bounds, lambda sb: self._get(sname, sb), sshape)


def dequant_box(w: torch.Tensor, bounds, read_scale, scale_shape: tuple[int, ...], block: int = BLOCK) -> torch.Tensor:
    """Dequantise the FP8 box `w` = Wq[r0:r1, c0:c1] of a block-scaled matrix: read only the scale
    blocks it touches (`read_scale(((bi0, bi1), (bj0, bj1)))`) and multiply each element by its
    block's scale, S[i//128, j//128]."""
    (r0, r1), (c0, c1) = bounds
    bi0, bi1, bj0, bj1 = r0 // block, (r1 - 1) // block + 1, c0 // block, (c1 - 1) // block + 1
    if bi1 > scale_shape[0] or bj1 > scale_shape[1]:
        raise UserError(f"FP8 scale shape {list(scale_shape)} does not cover rows {r1} / columns {c1} in {block}x{block} blocks")
    s = read_scale(((bi0, bi1), (bj0, bj1))).float()
    rows = torch.arange(r0, r1) // block - bi0
    cols = torch.arange(c0, c1) // block - bj0
    return w.float() * s[rows][:, cols]


# ----------------------------------------------------------------------------------------- filling
def _local_box(p: torch.Tensor) -> tuple[torch.Tensor, Box]:
    """(local tensor, its box in the global tensor) of a parameter or buffer, DTensor or plain."""
    from dsv3.parallel.init import local_box

    local, offset, _ = local_box(p)
    return local, tuple(slice(o, o + n) for o, n in zip(offset, local.shape))


@torch.no_grad()
def fill_module(module: nn.Module, reader: SliceReader) -> list[str]:
    """Copy into every parameter and persistent buffer of `module` (materialised; plain tensors or
    DTensor shards) its local box read from `reader`; names are the single-process ones
    (activation-checkpoint / compile wrappers stripped). Returns the names filled. A tied
    `lm_head.weight` absent from the files reads `model.embed_tokens.weight`."""
    from dsv3.parallel.init import canonical_name

    filled, missing = [], []
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        persistent = [(n, b) for n, b in mod.named_buffers(recurse=False)
                      if b is not None and n not in mod._non_persistent_buffers_set]
        for pname, p in list(mod.named_parameters(recurse=False)) + persistent:
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = canonical_name(f"{mod_name}.{pname}" if mod_name else pname)
            src = name
            if src not in reader and src == "lm_head.weight" and reader.cfg.tie_word_embeddings:
                src = "model.embed_tokens.weight"
            if src not in reader:
                missing.append(name)
                continue
            local, box = _local_box(p)
            reader.read_into(local, src, box, raw=local.dtype in QUANTISED)  # a module kept quantised: as stored
            filled.append(name)
    if missing:
        raise UserError(f"{reader.path}: missing tensors: {_few(sorted(missing))}")
    return filled
