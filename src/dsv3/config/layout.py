"""Pipeline layout arithmetic, without torch (config validation uses it): which decoder layers each
pipeline stage holds (`parallel.pp_layer_offset`, MindSpore `model_config.offset`) and which layers
are recomputed (`train.recompute`, `parallel.recompute_layers`, MindSpore `recompute_config.recompute`).
"""

from __future__ import annotations

from dsv3.errors import UserError

MODES = ("none", "full", "selective")


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous decoder-layer ids per stage, remainder to the earlier stages."""
    base, rem = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < rem else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_layers(model_cfg, n_stages: int, offset: list[int] | None = None) -> list[list[int]]:
    """Decoder-layer ids of every pipeline stage (the MTP layers always sit at the end of the last stage).

    Without `offset`: contiguous, remainder to the earlier stages. With `offset` (MindFormers'
    `model_config.offset`, one entry per stage; its `set_layer_stage_recompute` rule): stage i holds
    num_hidden_layers // n_stages + offset[i] layers. The counts add up either to num_hidden_layers
    or to num_hidden_layers + the MTP layers, the last stage's count then including them. The 671B
    YAML: 61 // 16 = 3, offset [1 x 15, -1] -> [4 x 15, 2] = 62 = 61 + 1 MTP: stages 0-14 hold 4
    decoder layers each (60), stage 15 holds layer 60 and the MTP layer. A 4-layer model with
    offset [1, -1] on 2 stages: [3, 1].
    """
    n_layers = model_cfg.num_hidden_layers
    if offset is None:
        return split_layers(n_layers, n_stages)
    mtp = model_cfg.num_nextn_predict_layers
    if len(offset) != n_stages:
        raise UserError(f"parallel.pp_layer_offset (MindSpore model_config.offset) has {len(offset)} entries for "
                        f"{n_stages} pipeline stages; give one per stage")
    base = n_layers // n_stages
    counts = [base + o for o in offset]
    if sum(counts) == n_layers + mtp and mtp:
        counts[-1] -= mtp  # the last stage's share counted its MTP layers
    elif sum(counts) != n_layers:
        want = f"{n_layers}" + (f" or {n_layers + mtp} (with the {mtp} MTP layer{'s' * (mtp > 1)})" if mtp else "")
        raise UserError(f"parallel.pp_layer_offset {list(offset)}: stages get {base} + offset = {counts} layers, "
                        f"{sum(counts)} in all; the model's {n_layers} layers need a total of {want}")
    for i, c in enumerate(counts):
        if c < 1:
            raise UserError(f"parallel.pp_layer_offset {list(offset)} leaves pipeline stage {i} without a decoder layer")
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def recompute_layer_ids(model_cfg, mode: str, per_stage: list[list[int]], counts: list[int] | None) -> set[int]:
    """Layer ids (decoder layers 0..L-1, MTP blocks L..L+D-1) to recompute, given each stage's decoder
    layers `per_stage` (MTP blocks belong to the last stage) and the optional per-stage counts."""
    if mode not in MODES:
        raise UserError(f"train.recompute = {mode!r}: expected one of {', '.join(MODES)}")
    L, D = model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers
    if mode == "none":
        if counts is not None and any(counts):
            raise UserError(f"parallel.recompute_layers {counts} is set but train.recompute is 'none'; set train.recompute: full or selective")
        return set()
    stages = [list(ids) for ids in per_stage]
    stages[-1] += list(range(L, L + D))
    if counts is None:
        return {i for ids in stages for i in ids}
    if len(counts) != len(stages):
        raise UserError(f"parallel.recompute_layers (MindSpore recompute_config.recompute) has {len(counts)} entries for "
                        f"{len(stages)} pipeline stages; give one per stage")
    out: set[int] = set()
    for s, (c, ids) in enumerate(zip(counts, stages)):
        if not 0 <= c <= len(ids):
            raise UserError(f"parallel.recompute_layers[{s}] = {c}: pipeline stage {s} holds {len(ids)} layers "
                            f"(decoder{' + MTP' if s == len(stages) - 1 and D else ''}); use 0..{len(ids)}")
        out.update(ids[:c])
    return out


def check(run_cfg, n_stages: int) -> None:
    """Raise the one-line UserError a bad offset / recompute list gives, before any work."""
    per_stage = stage_layers(run_cfg.model, n_stages, run_cfg.parallel.pp_layer_offset)
    recompute_layer_ids(run_cfg.model, run_cfg.train.recompute, per_stage, run_cfg.parallel.recompute_layers)
