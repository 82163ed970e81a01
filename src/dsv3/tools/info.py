"""`dsv3 info`: parameter and FLOP accounting of a model config, without allocating any weights.

The model is built on the meta device (shapes only), so the 671B preset is counted in well under a
second on a laptop. Counts:

* total: every parameter of the main model (embedding and output head included), MTP excluded;
* activated per token: the same, with each MoE layer's routed experts counted K/E times
  (K experts chosen of E); embedding and head are included (both are touched for every token);
* MTP: parameters of the MTP modules themselves; their embedding and head are tied to the main
  ones (the hub files carry copies, `dsv3.checkpoint.hf_map`), so they are not counted again;
* forward FLOPs per token: 2 x activated matrix parameters (the embedding is a lookup, not a
  matmul) + attention scores and weighted values, 2·H·(P+R)·s + 2·H·V·s per layer, with s the mean
  causal context (L+1)/2 of a sequence of `--seq-len` tokens (naive attention). Training ≈ 3x forward.

With `--model DIR` the checkpoint's files are also checked (names and shapes from the headers, no
tensor data read), and the bytes per weight and the batch-1 decode bound (memory bandwidth / bytes
read per token) are reported (`dsv3.tools.decode_bound`). The last lines say which kernels the quantised
formats run on this machine (`dsv3.kernels.native`: native ISA, or torch's paths and why).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from dsv3.config.schema import ModelConfig


@dataclass
class Accounting:
    total: int
    """Main-model parameters (embedding, head, all experts)."""
    activated: int
    """Parameters used per token by the main model."""
    mtp: int
    """Parameters of the MTP modules (embedding/head shared with the main model)."""
    mtp_activated: int
    """Of which used per token."""
    embedding: int
    """Embedding parameters (a lookup; in `total` and `activated`, not in FLOPs)."""
    flops_per_token: float
    """Forward FLOPs per token of the main model at `seq_len` (matmuls + attention)."""
    mtp_flops_per_token: float
    """Forward FLOPs per token of the MTP modules (their head matmul included)."""
    seq_len: int
    """Sequence length the attention FLOPs assume."""


def account(cfg: ModelConfig, seq_len: int = 4096) -> Accounting:
    """Count parameters and FLOPs of `cfg` on the meta device."""
    import torch

    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    total = activated = mtp = mtp_act = 0
    mm = mtp_mm = 0.0  # activated matrix params (matmuls)
    for name, p in model.named_parameters():  # tied tensors are yielded once
        n = p.numel()
        used = n * frac if ".mlp.experts." in name else n
        is_matmul = p.dim() >= 2 and name != "model.embed_tokens.weight"
        if name.startswith("model.mtp."):
            mtp += n
            mtp_act += used
            mtp_mm += used if is_matmul else 0
        else:
            total += n
            activated += used
            mm += used if is_matmul else 0
    attn = attention_flops(cfg, seq_len)
    head = cfg.vocab_size * cfg.hidden_size
    return Accounting(
        total=total, activated=round(activated), mtp=mtp, mtp_activated=round(mtp_act),
        embedding=model.model.embed_tokens.weight.numel(),
        flops_per_token=2 * mm + cfg.num_hidden_layers * attn,
        mtp_flops_per_token=cfg.num_nextn_predict_layers * (attn + 2 * head) + 2 * mtp_mm,
        seq_len=seq_len,
    )


def attention_flops(cfg: ModelConfig, seq_len: int, dense: bool = False) -> float:
    """Scores and weighted values of one layer, per token, at the mean causal context (naive attention).

    With sparse attention (V3.2; `dense=False`) each query attends to at most `index_topk` keys, and
    the indexer scores every visible key: 2·G·E·s for q·k per indexer head plus G·s for the weighting.
    """
    H, P, R, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ctx = (seq_len + 1) / 2
    if not cfg.sparse_attention or dense:
        return 2 * H * (P + R) * ctx + 2 * H * V * ctx
    # mean over positions 1..L of min(position, k)
    k = min(cfg.index_topk, seq_len)
    keys = (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len
    G, E = cfg.index_n_heads, cfg.index_head_dim
    return 2 * H * (P + R) * keys + 2 * H * V * keys + 2 * G * E * ctx + G * ctx


def cache_values_per_token(cfg: ModelConfig) -> int:
    """Values cached per token over all main layers: the absorbed latent, plus the indexer key with DSA."""
    return (cfg.latent_dim + (cfg.index_head_dim if cfg.sparse_attention else 0)) * cfg.num_hidden_layers


def family(cfg: ModelConfig) -> str:
    """One line naming the architecture variant a config describes."""
    scores = "Hadamard + FP8 scores" if cfg.index_impl == "hadamard_fp8" else "plain fp32 scores"
    attn = (f"DeepSeek-V3.2 sparse attention (indexer: {cfg.index_n_heads} heads x {cfg.index_head_dim}, "
            f"top-{cfg.index_topk} keys, {scores})"
            if cfg.sparse_attention else "dense MLA (DeepSeek-V3 / V3.1)")
    routing = (f"{cfg.n_routed_experts} routed experts, top-{cfg.num_experts_per_tok}, {cfg.scoring_func} scores, "
               + (f"{cfg.n_group} groups keep {cfg.topk_group}" if cfg.n_group > 1 and cfg.topk_method != "greedy"
                  else "no group limit"))
    return f"{attn}; {routing}; {cfg.n_shared_experts} shared expert(s)"


def layer_flops(cfg: ModelConfig, seq_len: int = 4096) -> tuple[dict[int, float], float]:
    """Forward FLOPs per token of each decoder layer (ids 0..L-1) and MTP module (ids L..L+D-1, its
    projection and its use of the shared head included), with `account`'s rules; and of the main head."""
    import torch

    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    attn, head = attention_flops(cfg, seq_len), 2 * cfg.vocab_size * cfg.hidden_size

    def mm(module) -> float:
        return sum(2 * p.numel() * (frac if ".experts." in f".{n}" else 1) for n, p in module.named_parameters() if p.dim() >= 2)

    out = {i: mm(layer) + attn for i, layer in enumerate(model.model.layers)}
    for k, mod in enumerate(model.model.mtp):
        out[cfg.num_hidden_layers + k] = mm(mod) + attn + head
    return out, head


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML preset name or path (configs/*.yaml), or an HF config.json")
    src.add_argument("--model", help="HF checkpoint directory: its config.json, and its files are checked")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a YAML field, e.g. model.num_hidden_layers=4")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs (default 4096)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d = p.add_argument_group("decode bound (with --model)")
    d.add_argument("--quantization", default=None, help="bytes as loaded with this scheme (w8a8 | int8 | int4[:G] | fp8); default: as stored")
    d.add_argument("--dtype", default="float32", help="dtype of the unquantised weights with --quantization (default float32, the CPU default)")
    d.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s to assume (default: measured now by a 256 MB copy)")


def run(args: argparse.Namespace) -> int:
    from dsv3.config.presets import load_model_config

    checked, bound = "", {}
    if args.model:
        from dsv3.checkpoint.io import check_checkpoint

        cfg, reader = check_checkpoint(args.model)
        checked = f"{len(reader.meta)} tensors in {len(reader.files)} file(s): names and shapes match config.json"
        bound = _decode_bound(args, cfg, reader)
        reader.close()
    else:
        cfg = load_model_config(args.config, [s if s.startswith("model.") else f"model.{s}" for s in args.set])
    acc = account(cfg, args.seq_len)
    from dsv3.kernels.native import describe

    kernels = describe()
    if args.json:
        print(json.dumps({**asdict(acc), "architecture": family(cfg), "cache_values_per_token": cache_values_per_token(cfg),
                          "checkpoint": checked or None, **({"decode": bound} if bound else {}), "kernels": kernels}, indent=2))
        return 0
    rows = [
        ("parameters (main, total)", _fmt(acc.total)),
        ("parameters activated per token", _fmt(acc.activated)),
        ("  of which embedding", _fmt(acc.embedding)),
        (f"MTP parameters ({cfg.num_nextn_predict_layers} module(s), embed/head shared)", _fmt(acc.mtp)),
        ("MTP activated per token", _fmt(acc.mtp_activated)),
        (f"forward FLOPs per token (seq {acc.seq_len})", _fmt(acc.flops_per_token)),
        ("training FLOPs per token (~3x forward)", _fmt(3 * acc.flops_per_token)),
        ("MTP forward FLOPs per token", _fmt(acc.mtp_flops_per_token)),
        ("KV cache per token (absorbed latent" + (" + indexer key" if cfg.sparse_attention else "") + ", all layers)",
         f"{cache_values_per_token(cfg)} values"),
    ]
    if cfg.sparse_attention:
        for L in sorted({acc.seq_len, 32768, 131072}):
            sp, de = attention_flops(cfg, L), attention_flops(cfg, L, dense=True)
            rows.append((f"attention FLOPs per token per layer at {L} tokens: sparse vs dense MLA",
                         f"{_fmt(sp)} vs {_fmt(de)} ({de / sp:.1f}x fewer)"))
    rows.insert(0, ("architecture", family(cfg)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for line in kernels:  # which path each quantised format runs (dsv3.kernels.native)
        print(line)
    if checked:
        print(f"checkpoint: {checked}")
    if bound:
        print(f"weights: {bound['bytes_per_weight']:.3f} bytes per weight ({bound['source']}), {_fmt(bound['resident_bytes'])}B resident; "
              f"{_fmt(bound['bytes_per_token'])}B read per decoded token")
        print(f"decode bound at batch 1: {bound['tokens_per_s_bound']:.1f} tok/s at {bound['bandwidth_gb_s']:.1f} GB/s "
              f"({bound['bandwidth_source']})")
    return 0


def _decode_bound(args, cfg, reader) -> dict:
    """Bytes per weight and the batch-1 decode bound (`dsv3.tools.decode_bound`)."""
    from dsv3.checkpoint.load import parse_dtype
    from dsv3.tools.decode_bound import measure_bandwidth, planned_bytes, stored_bytes

    if args.quantization:
        wb, source = planned_bytes(cfg, args.quantization, parse_dtype(args.dtype)), f"as loaded with --quantization {args.quantization}"
    else:
        wb, source = stored_bytes(reader, cfg), "as stored"
    if args.bandwidth is not None:
        bw, bw_source = args.bandwidth * 1e9, "assumed (--bandwidth)"
    else:
        bw, bw_source = measure_bandwidth(), "measured now with one 256 MB copy; a busy machine reads low"
    return {"source": source, "weights": wb.weights, "resident_bytes": wb.bytes, "bytes_per_weight": wb.per_weight,
            "bytes_per_token": wb.activated_bytes, "bandwidth_gb_s": bw / 1e9, "bandwidth_source": bw_source,
            "tokens_per_s_bound": bw / max(wb.activated_bytes, 1)}
