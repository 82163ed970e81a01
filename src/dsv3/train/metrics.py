"""Training metrics: FLOPs per token and MFU, the per-step log line, metrics.jsonl, TensorBoard.

FLOPs count matrix multiplies only (2 per multiply-add), x3 for forward + backward:
    per token = 6 · (weights a token multiplies: attention, dense/shared/8 routed experts, heads)
              + 3 · Σ_layers H·T·(d_qk + d_v)        (causal attention scores + values, T/2 keys on average)
The embedding lookup costs nothing; each MTP depth adds its projection, block and a second head.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from dsv3.config.schema import ModelConfig

# Dense bf16 peak TFLOP/s by device-name fragment (no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "4090": 165.0}


def _attn_matmul_params(c: ModelConfig) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    q = D * H * c.qk_head_dim if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    return q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D


def _ffn_matmul_params(c: ModelConfig, layer: int) -> int:
    D = c.hidden_size
    if not c.is_moe_layer(layer):
        return 3 * D * c.intermediate_size
    return D * c.n_routed_experts + (c.num_experts_per_tok + c.n_shared_experts) * 3 * D * c.moe_intermediate_size


def train_flops_per_token(c: ModelConfig, seq_len: int, mtp_depth: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`."""
    depth = c.num_nextn_predict_layers if mtp_depth is None else mtp_depth
    head = c.hidden_size * c.vocab_size
    attn_scores = c.num_attention_heads * seq_len * (c.qk_head_dim + c.v_head_dim)
    params, scores = head, 0
    for i in range(c.num_hidden_layers + depth):
        params += _attn_matmul_params(c) + _ffn_matmul_params(c, i)
        scores += attn_scores
        if i >= c.num_hidden_layers:  # MTP depth: eh_proj and its own pass through the shared head
            params += 2 * c.hidden_size * c.hidden_size + head
    return 6.0 * params + 3.0 * scores


def peak_flops(device_name: str, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else a known GPU's bf16 peak; None when unknown (CPU, fp32)."""
    if override_tflops:
        return override_tflops * 1e12
    if precision != "bf16":
        return None
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tf * 1e12
    return None


def format_line(r: dict[str, Any]) -> str:
    """One human line per logged step: step N/total, losses, lr, ..., expert load per MoE layer, ETA."""
    parts = [f"step {r['step']}/{r['total_steps']}" if "total_steps" in r else f"step {r['step']}", f"loss {r['loss']:.4f} (lm {r['lm_loss']:.4f} mtp {r['mtp_loss']:.4f} aux {r['aux_loss']:.2e})",
             f"lr {r['lr']:.3e}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:.0f} tok/s"]
    if r.get("indexer_loss"):
        parts.insert(2, f"indexer KL {r['indexer_loss']:.4f}")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("expert_load"):
        parts.append("load max/mean " + " ".join(f"{x:.2f}" for x in r["expert_load"]))
    if r.get("eta_s") is not None:
        s = round(r["eta_s"])
        parts.append(f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}")
    return " | ".join(parts)


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` (flushed per line) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():  # a fresh run over one that saved no checkpoint
            self.path.replace(self.path.with_name("metrics.prev.jsonl"))
        self.file = self.path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: metrics.jsonl holds everything; say once how to get the events
                print("logging.tensorboard: the tensorboard package is not installed, no TensorBoard events are written "
                      "(metrics.jsonl has every value; pip install tensorboard to get them)", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old records (atomically)."""
        keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip() and _step_of(ln) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])
                elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/layer{i}", x, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # unreadable line: drop it


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of `RUN_DIR/metrics.jsonl` (skipping unreadable lines)."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out
