"""`train.init_from` (MindSpore `load_checkpoint`): start a run from existing weights.

One function, `load_init_weights`: the model is built on the meta device and every tensor streamed
straight into place by the HF loader (`dsv3.checkpoint.load.load_checkpoint_into`: FP8 dequantised,
expert tensors stacked, names/shapes checked), as fp32 master weights. Accepted directories:
* an HF safetensors directory (config.json + model*.safetensors, BF16 or FP8);
* a `dsv3 train` checkpoint `step-N` (model.safetensors + config.resolved.yaml) or a run directory
  (its latest checkpoint). Only the weights are taken: the optimizer is fresh and the run starts at step 0.

The checkpoint's architecture must equal the run's `model` section (runtime switches and training
factors aside); otherwise one line names every differing field. MTP: the run may train with the
checkpoint's MTP depth or without MTP (its MTP layers are then skipped).

`InitSource` checks a checkpoint against the run and fills any layout's parts with each rank's own
slices (`dsv3.checkpoint.slices`); `dsv3.parallel.build.build_parallel_model(init_from=...)` uses it
after materialising a rank's shards, and `load_init_weights` is its one-process case.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

NOT_ARCHITECTURE = {"attn_impl", "moe_impl", "mtp_hidden", "torch_dtype", "initializer_range", "aux_loss_alpha",
                    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "num_nextn_predict_layers"}
"""ModelConfig fields that may differ between the checkpoint and the run (no effect on the weights' maths)."""


def resolve_init_dir(path: str | Path) -> Path:
    """The directory to read: `path` itself, or for a `dsv3 train` run directory its latest checkpoint."""
    from dsv3.train.checkpoint import checkpoint_root, latest_checkpoint

    p = Path(path)
    if p.is_file():
        raise UserError(f"train.init_from {p}: expected a directory (HF safetensors, or a dsv3 checkpoint step-N); "
                        f"MindSpore .ckpt files are not supported: convert them to HF safetensors first")
    if not p.is_dir():
        raise UserError(f"train.init_from {p}: directory not found")
    if not any(p.glob("*.safetensors")) and (latest := latest_checkpoint(checkpoint_root(p))) is not None:
        return latest
    return p


def architecture_diff(ckpt: ModelConfig, run: ModelConfig) -> list[str]:
    """'field: checkpoint X, config Y' for every architecture field that differs."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in NOT_ARCHITECTURE:
            continue
        a, b = getattr(ckpt, f.name), getattr(run, f.name)
        if a != b:
            out.append(f"{f.name}: checkpoint {a!r}, config {b!r}")
    return out


class InitSource:
    """The weights `train.init_from` names, checked against the run's model and ready to fill any
    layout's parts: `fill(parts)` gives every rank only its own slices.

    * safetensors (an HF directory, FP8 or not; a single-process `dsv3 train` checkpoint): each
      parameter's local box is read with `dsv3.checkpoint.slices` (get_slice, never a whole tensor
      a rank keeps a shard of);
    * a distributed `dsv3 train` checkpoint (`.metadata` with our manifest, verified; its pickle read
      through the allow-list of `dsv3.parallel.dcp.read_metadata`): DCP reads each rank's shards (model only).
    Names and shapes are checked from the file headers when opening, before anything is allocated.
    """

    def __init__(self, cfg: ModelConfig, path: str | Path):
        from dsv3.checkpoint.reader import load_dir_config

        self.dir = d = resolve_init_dir(path)
        self.cfg = cfg
        ckpt_cfg = load_dir_config(d)[0]
        diff = architecture_diff(ckpt_cfg, cfg)
        if diff:
            raise UserError(f"train.init_from {d}: the checkpoint's architecture differs from the run's model config: "
                            + "; ".join(diff))
        self.dcp = _is_dsv3_dcp(d)
        self.reader = None
        if not self.dcp:
            from dsv3.checkpoint.reader import CheckpointReader, count_mtp_layers

            files = CheckpointReader(d)
            try:
                have = count_mtp_layers(files, ckpt_cfg)
                self._check_mtp(have)
                self.reader = self._slice_reader(files)
            except BaseException:
                files.close()
                raise
            return
        self._check_mtp(_dcp_mtp_layers(d))

    def _check_mtp(self, have: int) -> None:
        want = self.cfg.num_nextn_predict_layers
        if want not in (0, have):
            raise UserError(f"train.init_from {self.dir}: model.num_nextn_predict_layers is {want} but the checkpoint holds "
                            f"{have} MTP layer(s); set it to {have} (train them) or 0 (no MTP)")
        self.skipped_mtp = have - want

    def _slice_reader(self, files):
        """Missing / unexpected / mis-shaped tensors: one line, from the headers only; then the reader."""
        from dsv3.checkpoint.load import load_checkpoint_into
        from dsv3.checkpoint.slices import SliceReader
        from dsv3.model.transformer import Transformer

        with torch.device("meta"):
            meta = Transformer(self.cfg)
        load_checkpoint_into(meta, files, torch.float32, "meta", skip_mtp_layers=self.skipped_mtp, dry_run=True)
        return SliceReader(files, self.cfg, skip_mtp_layers=self.skipped_mtp)

    def fill(self, parts: list[torch.nn.Module]) -> None:
        """Copy this rank's slices into its materialised `parts` (a Transformer or pipeline stages,
        any parallelism applied). Collective for a DCP checkpoint under a process group."""
        if self.dcp:
            from dsv3.parallel import dcp as pdcp

            pdcp.load(self.dir, parts)
        else:
            from dsv3.checkpoint.slices import fill_module

            for part in parts:
                fill_module(part, self.reader)

    @property
    def bytes_read(self) -> int | None:
        """Bytes read from the safetensors shards so far (None for DCP)."""
        return None if self.reader is None else self.reader.bytes_read

    def describe(self) -> str:
        return f"init_from {self.dir}{'; its MTP layers skipped' if self.skipped_mtp else ''}; fresh optimizer, step 0"

    def close(self) -> None:
        if self.reader is not None:
            self.reader.files.close()


def _is_dsv3_dcp(d: Path) -> bool:
    """Whether `d` is a distributed `dsv3 train` checkpoint: a DCP `.metadata` with the manifest and
    trainer files dsv3 writes beside it, every file verifying against the manifest. A `.metadata`
    anywhere else (e.g. beside an HF config.json) is refused: it is a pickle, read only from our layout."""
    from dsv3.train.checkpoint import MANIFEST, verify_checkpoint

    if not (d / ".metadata").is_file() or any(d.glob("*.safetensors")):
        return False
    missing = [f for f in (MANIFEST, "trainer_state.pt", "config.resolved.yaml") if not (d / f).is_file()]
    if missing:
        raise UserError(f"train.init_from {d}: holds a DCP .metadata but is not a checkpoint written by `dsv3 train` "
                        f"(no {', '.join(missing)}); only dsv3's own distributed checkpoints are read")
    if (why := verify_checkpoint(d)) is not None:
        raise UserError(f"train.init_from {d}: the checkpoint {why}")
    return True


def _dcp_mtp_layers(d: Path) -> int:
    """MTP modules (`model.mtp.{k}.`) a DCP checkpoint holds, from its metadata (allow-listed unpickling)."""
    import re

    from dsv3.parallel.dcp import read_metadata

    try:
        keys = read_metadata(d).state_dict_metadata
    except UserError as e:
        raise UserError(f"train.init_from {e}") from None
    return len({m.group(1) for k in keys if (m := re.match(r"model\.mtp\.(\d+)\.", k))})


def load_init_weights(cfg: ModelConfig, path: str | Path, device: torch.device | str,
                      log: Callable[[str], None] | None = None) -> torch.nn.Module:
    """A `Transformer(cfg)` in train mode with fp32 weights read from `path` (see the module docstring):
    the trivial layout of `InitSource` (one process, every box the whole tensor)."""
    from dsv3.model.transformer import Transformer

    source = InitSource(cfg, path)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device=device)
        model.init_non_persistent_buffers(device)
        source.fill([model])
    finally:
        source.close()
    if log is not None:
        n = sum(p.numel() for p in model.parameters())
        log(f"{source.describe()}: {n:,} parameters loaded (fp32 master weights)")
    return model.train()
