"""MindSpore Transformers YAML (the seed's `pretrain_deepseek3_*.yaml`) -> our run-config dict.

Every key of the seed's files is in exactly one of three places:
* a map to one of our fields (honoured; the tables in `dsv3.config.mindspore_keys`),
* a rule below (a key whose value we check or translate, e.g. `aux_loss_factors`): `SECTIONS` maps
  each top-level key to its rule, and `_combine` holds the rules that read several keys,
* the IGNORED table (`dsv3.config.mindspore_keys`): keys that only mean something to MindSpore/Ascend
  (graph mode, fused ops, strategy files, ...). They are reported once, on one line.
Any other key is an error naming it, so a misspelt key never passes silently.
Predict YAMLs (`dsv3 generate --config`) are read by `dsv3.config.mindspore_predict`.
"""

from __future__ import annotations

from typing import Any, Callable

from dsv3.config.mindspore_keys import _MODEL_MAP, _MOE_MAP, _PARALLEL_MAP, _Translator, _group
from dsv3.errors import UserError


def _mindformers_recompute_counts(o: dict) -> str | None:
    """MindFormers reads `recompute[i]` for pipeline stage i (extra entries unused) and recomputes the
    first min(count, stage size) layers; our `parallel.recompute_layers` is strict, so the translated
    list is cut to that. Returns the note saying so, or None when nothing changed."""
    from types import SimpleNamespace

    from dsv3.config.schema import ModelConfig
    from dsv3.config.layout import stage_layers

    counts, pp = o["parallel"]["recompute_layers"], int(o["parallel"].get("pipeline_stage", 1))
    mtp = int(o["model"].get("num_nextn_predict_layers", ModelConfig.num_nextn_predict_layers))
    model = SimpleNamespace(num_hidden_layers=int(o["model"].get("num_hidden_layers", ModelConfig.num_hidden_layers)),
                            num_nextn_predict_layers=mtp)
    try:
        sizes = [len(ids) for ids in stage_layers(model, pp, o["parallel"].get("pp_layer_offset"))]
    except UserError:
        return None  # the offset error is raised by validation
    sizes[-1] += mtp
    if len(counts) < pp:
        return None  # too short: validation names it
    new = [min(c, n) for c, n in zip(counts[:pp], sizes)]
    if new == counts:
        return None
    o["parallel"]["recompute_layers"] = new
    return (f"recompute_config.recompute {counts} read as MindFormers does for pipeline_stage {pp} (entry i for stage i, "
            f"at most the stage's {sizes} layers): parallel.recompute_layers {new}")


MINDFORMERS_LAYOUT = "_mindformers_layout"
"""Key `translate` leaves in its output: `run_config_from_dict` pops it and applies `mindformers_layout`
after the `--set` overrides, so a YAML run under another pipeline_stage (one process) reads as MindFormers would."""


def mindformers_layout(o: dict, overrides: list[str] | None, source: str = "config") -> list[str]:
    """MindFormers' reading of `model_config.offset` and `recompute_config.recompute` for the pipeline_stage
    that runs (the YAML's, or `--set parallel.pipeline_stage`): the offsets only when there are stages to place
    (one stage: dropped), `recompute[i]` for stage i and at most its layers (`_mindformers_recompute_counts`).
    A list the user set with `--set` is kept as given. Returns the note saying what changed, if anything."""
    par = o.get("parallel") or {}
    given = {item.split("=", 1)[0].strip() for item in overrides or []}
    notes = []
    if par.get("pp_layer_offset") is not None and int(par.get("pipeline_stage", 1)) == 1 and "parallel.pp_layer_offset" not in given:
        notes.append(f"model.model_config.offset {par.pop('pp_layer_offset')} not applied (pipeline_stage 1: MindFormers "
                     f"reads the offsets only when there are stages to place)")
    if par.get("recompute_layers") is not None and "parallel.recompute_layers" not in given:
        note = _mindformers_recompute_counts(o)
        if note:
            notes.append(note)
    return [f"{source}: {'; '.join(notes)}"] if notes else []


def translate(data: dict, source: str = "config", list_ignored: bool = True) -> tuple[dict, list[str]]:
    """Translate a MindSpore-style run YAML into our RunConfig dict (see the module docstring): every
    top-level key through its rule in `SECTIONS`, then the rules that combine keys (`_combine`).
    Returns the dict and the notes for the user (the ignored keys on one line: listed, or only counted
    with `list_ignored=False`, as `dsv3 dryrun` / `balance` do without `--verbose`); the caller prints them."""
    t = _Translator(source)
    t.walk(data, "", {key: (lambda v, p, rule=rule: rule(t, v, p)) for key, rule in SECTIONS.items()})
    _combine(t)
    _sft_dataset(t)
    if t.ignored:
        listed = _group(t.ignored) if list_ignored else f"{len(t.ignored)} keys (--verbose lists them)"
        t.notes.append(f"{source}: ignored (MindSpore/Ascend-only): {listed}")
    return {k: v for k, v in t.out.items() if v}, t.notes


def _keep(t: _Translator, key: str) -> Callable[[Any, str], None]:
    """A handler that keeps the value and its path for `_combine`."""
    return lambda val, path: t.extra.__setitem__(key, (val, path))


def _model_config(t: _Translator, v: Any, p: str) -> None:
    o = t.out

    def ext(val, path):
        if str(val) not in ("None", "none"):
            raise t.err(path, f"{val!r} is not supported for pretraining (expected 'None': plain RoPE)")
        o["model"]["rope_scaling"] = None

    def dtype(val, path):
        if val not in ("bfloat16", "float32", "float16"):
            raise t.err(path, f"{val!r} is not a dtype (bfloat16 / float32)")
        if val == "float16":
            raise t.err(path, "float16 training is not supported; use bfloat16 (fp32 master weights)")
        o["train"]["precision"] = "bf16" if val == "bfloat16" else "fp32"

    def offset(val, path):
        # MindFormers: stage i holds (num_layers + mtp_depth) // pipeline_stage + offset[i] layers
        if isinstance(val, list) and all(isinstance(x, int) for x in val):
            o["parallel"]["pp_layer_offset"] = val
        elif val != 0:
            raise t.err(path, f"{val!r}: expected 0 or a list of ints, one per pipeline stage (nested lists "
                              f"for interleaved stages are not supported)")

    h = {k: t.put("model", f) for k, f in _MODEL_MAP.items()}
    h.update(offset=offset, seq_length=_keep(t, "seq_length"), mtp_loss_factor=t.put("train", "mtp_loss_factor"),
             extend_method=ext, compute_dtype=dtype)
    t.walk(v, p, h)


def _model(t: _Translator, v: Any, p: str) -> None:
    arch = lambda val, path: t.walk(val, path, {"type": t.expect(("DeepseekV3ForCausalLM",)), "auto_register": lambda *_: None})
    t.walk(v, p, {"model_config": lambda val, path: _model_config(t, val, path), "arch": arch})


def _moe(t: _Translator, v: Any, p: str) -> None:
    def z_loss(val, path):
        if val:
            raise t.err(path, f"{val} is not supported (DeepSeek-V3 uses no z-loss); set 0")

    h = {k: t.put("model", f) for k, f in _MOE_MAP.items()}
    h.update(use_gating_sigmoid=lambda val, path: t.out["model"].__setitem__("scoring_func", "sigmoid" if val else "softmax"),
             balance_via_topk_bias=lambda val, path: t.extra.__setitem__("balance", bool(val)),
             topk_bias_update_rate=t.put("train", "bias_update_rate"), aux_loss_factors=_keep(t, "aux_factors"),
             aux_loss_types=_keep(t, "aux_types"), z_loss_factor=z_loss, routing_policy=t.expect(("TopkRouterV2",)))
    t.walk(v, p, h)


def _data_config(t: _Translator, v: Any, p: str) -> None:
    o = t.out

    def data_path(val, path):
        if not isinstance(val, list) or not val:
            raise t.err(path, f"expected a list [weight, prefix, ...], got {val!r}")
        items = [str(x) for x in val]
        o["data"]["data_path"] = items[1:] if len(items) == 2 else items  # a single weighted prefix is the prefix

    def off(val, path):
        if val:
            raise t.err(path, "True is not supported (samples are packed without attention reset)")

    t.walk(v, p, {"random_seed": t.put("data", "random_seed"), "seq_length": _keep(t, "data_seq"),
                  "split": lambda val, path: o["data"].__setitem__("split", str(val).replace(" ", "")),
                  "reset_position_ids": t.put("data", "reset_position_ids"), "reset_attention_mask": off,
                  "eod_mask_loss": t.put("data", "eod_mask_loss"), "data_path": data_path})


def _train_dataset(t: _Translator, v: Any, p: str) -> None:
    def sizes(val, path):
        if not isinstance(val, list) or not 1 <= len(val) <= 3:
            raise t.err(path, f"expected [train, valid, test] sample counts, got {val!r}")
        t.extra["sizes"] = [int(x) for x in val]

    loader = lambda val, path: t.walk(val, path, {
        "type": t.expect(("BlendedMegatronDatasetDataLoader", "MindDataset"), lambda val, _: t.extra.__setitem__("loader", val)),
        "sizes": sizes, "config": lambda val, path: _data_config(t, val, path),
        "dataset_dir": _keep(t, "dataset_dir"), "shuffle": _keep(t, "shuffle")})
    t.walk(v, p, {"data_loader": loader})


def _lr(t: _Translator, v: Any, p: str) -> None:
    types = {"ConstantWarmUpLR": "ConstantWarmUpLR", "CosineWithWarmUpLR": "cosine"}

    def total(val, path):
        if val is not None and int(val) > 0:
            t.out["lr_schedule"]["total_steps"] = int(val)

    t.walk(v, p, {"type": t.expect(tuple(types), lambda val, path: t.out["lr_schedule"].__setitem__("type", types[val])),
                  "learning_rate": t.put("lr_schedule", "learning_rate"), "warmup_steps": t.put("lr_schedule", "warmup_steps"),
                  "warmup_ratio": t.put("lr_schedule", "warmup_ratio"), "lr_end": t.put("lr_schedule", "min_lr"),
                  "total_steps": total})


def _recompute_config(t: _Translator, v: Any, p: str) -> None:
    def recompute(val, path):
        if isinstance(val, bool):
            t.extra["recompute"] = val
        elif isinstance(val, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in val):
            t.extra["recompute"] = True
            t.out["parallel"]["recompute_layers"] = val
        else:
            raise t.err(path, f"{val!r}: expected a bool or a list of layer counts, one per pipeline stage")

    def select(val, path):
        if not isinstance(val, bool):
            raise t.err(path, f"{val!r}: only a bool is supported (True: recompute all but matrix products)")
        t.extra["select_recompute"] = val

    t.walk(v, p, {"recompute": recompute, "select_recompute": select})


def _callbacks(t: _Translator, v: Any, p: str) -> None:
    o = t.out
    if not isinstance(v, list):
        raise t.err(p, f"expected a list of callbacks, got {v!r}")

    def same_rate(val, path):  # the anchors of moe_config; the update itself is ours (dsv3.train.balance)
        if "bias_update_rate" in o["train"] and o["train"]["bias_update_rate"] != val:
            raise t.err(path, f"{val} differs from moe_config.topk_bias_update_rate {o['train']['bias_update_rate']}")
        o["train"]["bias_update_rate"] = val

    ign = lambda val, path: t.ignored.append(path)
    kinds = {"MFLossMonitor": {"per_print_times": t.put("logging", "log_interval")},
             "TopkBiasBalanceCallback": {
                 "balance_via_topk_bias": lambda val, path: t.extra.__setitem__("balance", t.extra.get("balance", True) and bool(val)),
                 "topk_bias_update_rate": same_rate, "expert_num": lambda *_: None, "micro_batch_num": lambda *_: None},
             "CheckpointMonitor": {"save_checkpoint_steps": t.put("checkpoint", "save_steps"),
                                   "keep_checkpoint_max": t.put("checkpoint", "keep_last"),
                                   **{k: ign for k in ("prefix", "integrated_save", "async_save", "checkpoint_format")}}}
    for i, cb in enumerate(v):
        where = f"{p}[{i}]"
        if not isinstance(cb, dict) or "type" not in cb:
            raise t.err(where, "expected a mapping with a 'type'")
        if cb["type"] not in kinds:
            raise t.err(where, f"callback type {cb['type']!r} is not known (expected {', '.join(kinds)})")
        t.walk({k: val for k, val in cb.items() if k != "type"}, where, kinds[cb["type"]])


def _parallel_context(t: _Translator, v: Any, p: str) -> None:
    if not isinstance(v, dict):
        raise t.err(p, f"expected a mapping, got {v!r}")
    if "enable_parallel_optimizer" in v:  # MindSpore's optimizer sharding over dp: FSDP here, else replicated (DDP)
        t.out["parallel"]["dp_shard"] = "fsdp" if v["enable_parallel_optimizer"] else "ddp"
    if set(v) - {"enable_parallel_optimizer"}:
        t.ignored.append(f"{p} (the graph-mode parallel context; enable_parallel_optimizer is read as parallel.dp_shard)")


def _load_ckpt(t: _Translator, v: Any, p: str) -> None:
    if v:  # an HF safetensors or dsv3 checkpoint directory (MindSpore .ckpt files are refused when loading)
        t.out["train"]["init_from"] = str(v)


def _put(section: str, field: str) -> Callable[[_Translator, Any, str], None]:
    return lambda t, v, p: t.put(section, field)(v, p)


def _walk(handlers: Callable[[_Translator], dict]) -> Callable[[_Translator, Any, str], None]:
    """The rule of a section whose keys all have plain handlers (`handlers(t)`)."""
    return lambda t, v, p: t.walk(v, p, handlers(t))


SECTIONS: dict[str, Callable[[_Translator, Any, str], None]] = {
    "seed": _put("train", "seed"), "output_dir": _put("checkpoint", "output_dir"),
    "resume_training": _put("checkpoint", "resume"), "load_checkpoint": _load_ckpt,
    "run_mode": lambda t, v, p: t.expect(("train",))(v, p),
    "runner_config": _walk(lambda t: {"epochs": lambda val, path: t.extra.__setitem__("epochs", int(val)),
                                      "batch_size": t.put("train", "batch_size")}),
    "runner_wrapper": _walk(lambda t: {"use_clip_grad": lambda val, path: t.out["optimizer"].setdefault("clip_grad", 1.0 if val else 0.0),
                                       "max_grad_norm": t.put("optimizer", "clip_grad")}),
    "optimizer": _walk(lambda t: {"type": t.expect(("AdamW", "adamw")), "betas": t.put("optimizer", "betas"),
                                  "eps": t.put("optimizer", "eps"), "weight_decay": t.put("optimizer", "weight_decay")}),
    "lr_schedule": _lr, "train_dataset": _train_dataset,
    "parallel_config": _walk(lambda t: {k: t.put("parallel", f) for k, f in _PARALLEL_MAP.items()}),
    "model": _model, "moe_config": _moe, "callbacks": _callbacks, "recompute_config": _recompute_config,
    "parallel": _parallel_context,
}
"""Top-level key of a MindSpore run YAML -> its rule (translator, value, path); any other key is an
error (or listed as ignored, `dsv3.config.mindspore_keys._IGNORED`)."""


def _combine(t: _Translator) -> None:
    """The rules that combine several keys (sequence lengths, balance losses, recompute, steps, eval)."""
    o, extra = t.out, t.extra
    seq, seq_path = extra.get("seq_length", (None, None))
    dseq, dseq_path = extra.get("data_seq", (None, None))
    if seq is not None and dseq is not None and seq != dseq:
        raise t.err(dseq_path, f"seq_length {dseq} differs from {seq_path} {seq}")
    if (seq or dseq) is not None:
        o["data"]["seq_length"] = seq or dseq
    if "aux_factors" in extra:
        factors, fpath = extra["aux_factors"]
        types = extra.get("aux_types", (["expert"] * len(factors), None))[0]
        if len(types) != len(factors):
            raise t.err(fpath, f"{len(factors)} factors for {len(types)} aux_loss_types")
        for kind, f in zip(types, factors):
            if kind == "expert":
                o["model"]["aux_loss_alpha"] = float(f)
            elif f:
                raise t.err(fpath, f"aux loss type {kind!r} with factor {f} is not supported (DeepSeek-V3 uses only 'expert')")
    if extra.get("recompute") or extra.get("select_recompute"):
        o["train"]["recompute"] = "selective" if extra.get("select_recompute") else "full"
    o[MINDFORMERS_LAYOUT] = True  # offset / recompute are read once `--set` overrides are in (`mindformers_layout`)
    if extra.get("balance") is False:
        o["train"]["bias_update_rate"] = 0.0
    o["model"].setdefault("topk_method", "noaux_tc")
    o["optimizer"].setdefault("weight_decay", 0.0)  # MindFormers' AdamW default (ours is 0.1)
    sizes = extra.get("sizes", [0])
    if "epochs" in extra and sizes[0] > 0:
        par = o["parallel"]
        gbs = o["train"].get("batch_size", 1) * par.get("data_parallel", 1) * par.get("micro_batch_num", 1)
        o["train"]["steps"] = max(1, extra["epochs"] * sizes[0] // gbs)
    if len(sizes) > 1 and sizes[1] > 0:
        o["eval"]["eval_iters"] = sizes[1]


def _sft_dataset(t: _Translator) -> None:
    """A fine-tuning YAML's `MindDataset` -> our SFT data (`data.type: sft`); its epochs -> train.epochs."""
    o, extra = t.out, t.extra
    if "shuffle" in extra and extra.get("loader") != "MindDataset":
        t.ignored.append(extra["shuffle"][1])
    if extra.get("loader") != "MindDataset":
        if "dataset_dir" in extra:
            raise t.err(extra["dataset_dir"][1], "dataset_dir belongs to a MindDataset loader (fine-tuning data)")
        return
    if "dataset_dir" not in extra:
        raise t.err("train_dataset.data_loader", "MindDataset needs a dataset_dir")
    path = str(extra["dataset_dir"][0])
    o["data"]["type"] = "sft"
    o["data"]["sft"] = {"path": path}
    if "shuffle" in extra:
        o["data"]["sft"]["shuffle"] = bool(extra["shuffle"][0])
    if "epochs" in extra:
        o["train"]["epochs"] = extra["epochs"]
    t.notes.append(f"{t.source}: train_dataset.data_loader MindDataset -> data.type sft, data.sft.path {path} (read as dsv3 "
                   f"SFT data: a `dsv3 preprocess --dataset-type qa|chat` prefix or an Alpaca/chat .json/.jsonl; MindRecord "
                   f"files are not read)")
