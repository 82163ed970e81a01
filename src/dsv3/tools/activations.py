"""Activation memory of one micro-batch of a pipeline stage, measured on fake tensors.

`stage_activation` runs the stage's own modules (the model's layers on torch's FakeTensorMode: shapes,
dtypes, no storage; the pipeline stage; the configured recompute wrappers; the trainer's loss)
forward and backward under `memtrack.TensorMemory`. `act_bytes` is what the forward leaves alive for
backward, `fwd_bwd_peak` the most alive at once during that micro-batch. Weight gradients are not
formed here (they are model states, counted from the build; `expert_weight_grads_off` keeps the
grouped experts' hand-written backward from forming them); MoE routing is taken as perfectly
balanced (`dsv3.tools.memory` adds the all-to-all buffers at a stated imbalance).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.tools.memtrack import compute_dtype, to_fake


@dataclass
class StageActivation:
    act_bytes: int
    """Bytes one micro-batch's forward leaves alive for its backward (stage input and output included)."""
    fwd_bwd_peak: int
    """Most bytes alive at once during that micro-batch's forward and backward (act_bytes included)."""
    logits_bytes: int = 0
    """Of act_bytes: what the heads' logits and their loss keep (proportional to the vocabulary)."""
    dispatch_bytes: int = 0
    """Of fwd_bwd_peak: the expert-parallel all-to-all buffers of the MoE layer running at the peak."""
    routed_live: int = 0
    """Bytes alive when the first MoE's routed experts return in the forward (`stage_activation`'s
    runs; 0 without an MoE): the moment an expert-parallel layer also holds its all-to-all buffers."""


@contextlib.contextmanager
def fused_attention():
    """`F.scaled_dot_product_attention` as the fused kernel a GPU runs (memory-efficient attention:
    it keeps the output and the log-sum-exp, never the scores), whatever the device the fake tensors
    claim. MLA's query/key (192) and value (128) head sizes differ, which CPU kernels answer with the
    math path (scores kept); that is what a CPU run costs, not a GPU one."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@contextlib.contextmanager
def expert_weight_grads_off():
    """The grouped experts (`dsv3.kernels.grouped.GroupedSwiGLU`) without their weight gradients, as
    autograd's own formulas skip the gradients `torch.autograd.grad` was not asked for. The hand-written backward
    decides by `ctx.needs_input_grad`, fixed in the forward, so here it would form the stacked [E, ...]
    gradients of every routed expert (all E of the single-device model, not a rank's E/ep) inside the
    layer's transient, on top of the gradients counted as model states. The weights enter detached:
    the forward and what it saves are unchanged (the weights' storages are ignored either way)."""
    from dsv3.kernels import grouped

    real = grouped.grouped_swiglu

    def detached(xs, counts, gate_w, up_w, down_w):
        return real(xs, counts, gate_w.detach(), up_w.detach(), down_w.detach())

    grouped.grouped_swiglu = detached
    try:
        yield
    finally:
        grouped.grouped_swiglu = real


@contextlib.contextmanager
def live_after_routed(mode, out: list[int]):
    """Append `mode`'s live bytes to `out` each time an MoE's routed experts return (`MoE.routed`)."""
    from dsv3.model.moe import MoE

    real = MoE.routed

    def routed(self, x):
        y = real(self, x)
        out.append(mode.live["meta"])
        return y

    MoE.routed = routed
    try:
        yield
    finally:
        MoE.routed = real


def stage_activation(cfg, layer_ids: list[int], first: bool, last: bool, recompute_ids: set[int], loss: str,
                     gpu_attention: bool = True) -> StageActivation:
    """One micro-batch (train.batch_size x data.seq_length) through a stage of the single-device model
    built on the meta device: decoder layers `layer_ids` (the embedding when `first`; norm, head, MTP
    and the loss when `last`), layers in `recompute_ids` wrapped as the trainer wraps them. `loss`:
    'fused' (one process: the fused head + CE), 'logits' (the parallel trainer's plain logits path)."""
    from dsv3.kernels import apply_fast_paths
    from dsv3.model.transformer import Transformer
    from dsv3.parallel.pp import TransformerStage
    from dsv3.parallel.recompute import apply_recompute
    from dsv3.tools.memtrack import TensorMemory
    from dsv3.train.loss import compute_loss, mean_ce, mtp_loss

    mc, dtype = cfg.model, compute_dtype(cfg)
    b, T = cfg.train.batch_size, cfg.data.seq_length
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        full = Transformer(mc).to(dtype)
    apply_fast_paths(full)  # the trainer's expert and linear paths: what they save is what is measured
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # torch's own checks touch it
    to_fake(full, fake)  # CPU-looking tensors without storage: the CPU kernels' choices (flash attention), autocast works
    whole = first and last and len(layer_ids) == mc.num_hidden_layers
    part = full if whole else TransformerStage(full, 0, layer_ids, first, last)
    apply_recompute(part, cfg.train.recompute, recompute_ids)
    part.train()
    embeds: list[torch.Tensor] = []
    for m in part.modules():
        if isinstance(m, nn.Embedding):
            m.register_forward_hook(lambda mod, inp, out: embeds.append(out))
    with fake:
        tokens = torch.zeros(b, T, dtype=torch.long)
        batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(b, T)}
    mode = TensorMemory(meta_routing=True)
    mode.ignore(list(part.parameters()), list(part.buffers()))
    routed: list[int] = []
    with fake, mode, expert_weight_grads_off(), live_after_routed(mode, routed), \
            (fused_attention() if gpu_attention else contextlib.nullcontext()):
        h = None if first else torch.empty(b, T, mc.hidden_size, dtype=dtype, requires_grad=True)
        mode.track(h)
        if whole:
            total, _ = compute_loss(part, batch, cfg.train.mtp_loss_factor, fused_ce=loss == "fused")
        else:
            out = part(h, tokens=tokens)
            if last:
                logits, mtp = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
                total = mean_ce(logits, tokens, batch["loss_mask"])
                if mtp:
                    total = total + mtp_loss(mtp, tokens, batch["loss_mask"], cfg.train.mtp_loss_factor)[0]
                del logits, mtp  # `out` stays alive: the pipeline runtime keeps a stage's outputs until its backward
        act = mode.live["meta"]  # fake tensors have meta storages
        wrt = [t for t in [h, *embeds] if t is not None and t.requires_grad]
        if last:
            torch.autograd.grad(total, wrt)
            del total
        else:  # the gradient the next stage sends back; `out` stays alive until then (the runtime keeps it)
            torch.autograd.grad(out, wrt, grad_outputs=torch.empty_like(out))
    return StageActivation(act_bytes=act, fwd_bwd_peak=mode.peak["meta"], routed_live=routed[0] if routed else 0)


def _describe(key: tuple) -> str:
    """A profile cache key in words, for progress lines."""
    if key[0] == "layer":
        return f"{'MoE' if key[1] else 'dense'} layer{', recomputed' if key[2] else ''}"
    if key[0] == "edge":
        ends = [e for e, on in (("embedding", key[1]), ("head + MTP + loss", key[2])) if on] or ["received input"]
        vocab = f", vocabulary {key[4]} (the logits' share)" if len(key) > 4 else ""
        return " and ".join(ends) + (", MTP recomputed" if key[3] else "") + vocab
    return f"whole model ({key[1]} loss)"


class ActivationProfile:
    """Activation bytes of one micro-batch per pipeline stage on one rank, from `stage_activation` runs.

    One process (pp 1, tp 1) runs the whole model once. Otherwise a stage is its pieces in order (the
    embedding or the received input, its decoder layers, the head / MTP / loss), so each kind of
    piece is run once and reused: a dense or MoE layer with or without recompute, the first stage's
    embedding, the last stage's head (its MTP block recomputed or not). A stage keeps the sum of its
    pieces' activations; its peak is that plus the largest piece's transient.

    Numbers are per tensor-parallel rank: the single-device run's bytes divided by tp (sequence
    parallel splits every activation of a layer; Korthikanti et al. 2022), plus what the tp plan keeps
    whole on every rank (`dsv3.tools.memory_tp`: the gathered inputs and low-rank latents of each
    layer, the residual stream and norms without sequence parallel, the gathered logits of each head
    and their loss)."""

    def __init__(self, cfg, gpu_attention: bool = True, log=None):

        self.cfg, self.gpu_attention, self.log = cfg, gpu_attention, log
        mc = cfg.model
        dims = cfg.layout()
        self.tp = dims.tp
        self.sp = dims.seq_parallel
        self.full_input_bytes = cfg.train.batch_size * cfg.data.seq_length * mc.hidden_size * compute_dtype(cfg).itemsize
        self.input_bytes = self.full_input_bytes // (self.tp if self.sp else 1)  # a stage's input: split only by SP
        self._cache: dict[tuple, StageActivation] = {}
        self._repl: dict[int, int] = {}

    def _run(self, key, layer_ids, first, last, rc_ids, loss="logits", cfg=None) -> StageActivation:
        if key not in self._cache:
            self._cache[key] = stage_activation(cfg or self.cfg, layer_ids, first, last, rc_ids, loss, self.gpu_attention)
            if self.log:
                self.log(f"profiled activations: {_describe(key)}")
        return self._cache[key]

    def replicated(self, i: int) -> int:
        """Bytes of layer i (an MTP layer's id included) a tp rank keeps beyond 1/tp of the single-device
        run's: the tensors the tp plan replicates, whole instead of split."""
        if self.tp == 1:
            return 0
        from dsv3.tools.memory_tp import replicated_layer_bytes

        key = int(self.cfg.model.is_moe_layer(i))
        if key not in self._repl:
            self._repl[key] = replicated_layer_bytes(self.cfg, i, self.sp)
        return self._repl[key] - self._repl[key] // self.tp

    def layer(self, i: int, recomputed: bool) -> tuple[int, int]:
        """(kept bytes, transient bytes) of decoder layer i (its kind: dense or MoE) on one rank; a
        recomputed layer holds its replicated tensors only while its backward reruns it."""
        moe = self.cfg.model.is_moe_layer(i)
        a = self._run(("layer", moe, recomputed), [i], False, False, {i} if recomputed else set())
        kept, trans = (a.act_bytes - self.full_input_bytes) // self.tp, (a.fwd_bwd_peak - a.act_bytes) // self.tp
        return (kept, trans + self.replicated(i)) if recomputed else (kept + self.replicated(i), trans)

    def forward_bytes(self, i: int) -> int:
        """Bytes of MoE layer i alive when its routed experts return on one rank (its input excluded):
        what it holds beside its all-to-all buffers, in its forward or its recompute's rerun."""
        a = self._run(("layer", self.cfg.model.is_moe_layer(i), False), [i], False, False, set())
        return (a.routed_live - self.full_input_bytes) // self.tp + self.replicated(i)

    def edge(self, first: bool, last: bool, mtp_recomputed: bool) -> tuple[int, int]:
        """(kept, transient) of a stage's ends on one rank: the embedding (first) or received input, and
        the head, MTP blocks and loss (last); a last stage's input is the last layer's output, not
        counted again. The logits part (proportional to the vocabulary) is whole on every tp rank."""
        mc = self.cfg.model
        mtp_layers = range(mc.num_hidden_layers, mc.num_hidden_layers + mc.num_nextn_predict_layers)
        mtp_ids = set(mtp_layers) if mtp_recomputed else set()
        key = ("edge", first, last, mtp_recomputed)
        a = self._run(key, [], first, last, mtp_ids)
        kept, trans = a.act_bytes - (self.full_input_bytes if last and not first else 0), a.fwd_bwd_peak - a.act_bytes
        vk, vt = self.logits(first, mtp_recomputed) if last else (0, 0)
        if self.tp == 1:
            return kept, trans
        if last:
            mtp = sum(self.replicated(i) for i in mtp_layers)
            kept, trans = (kept, trans + mtp) if mtp_recomputed else (kept + mtp * self.tp, trans)
        embed = self.full_input_bytes - self.input_bytes if first else 0  # its output, whole without SP
        return (kept - vk) // self.tp + vk + embed, (trans - vt) // self.tp + vt

    def logits(self, first: bool, mtp_recomputed: bool) -> tuple[int, int]:
        """(kept, transient) of a last stage's edge proportional to the vocabulary: the logits of every
        head, their loss and gradients (`memory_tp.vocab_bytes`); whole on every tp rank."""
        from dsv3.tools.memory_tp import vocab_bytes

        mc = self.cfg.model
        mtp_ids = set(range(mc.num_hidden_layers, mc.num_hidden_layers + mc.num_nextn_predict_layers)) if mtp_recomputed else set()
        key = ("edge", first, True, mtp_recomputed)

        def run(c):
            r = self._run(key + ((c.model.vocab_size,) if c is not self.cfg else ()), [], first, True, mtp_ids, cfg=c)
            return r.act_bytes, r.fwd_bwd_peak - r.act_bytes
        return vocab_bytes(run, self.cfg)

    def stage(self, layer_ids: list[int], first: bool, last: bool, rc_ids: set[int], dispatch: int = 0,
              copies: int = 0) -> StageActivation:
        """Pieces in order; backward runs them last to first, so while piece j works (its transient)
        the pieces before it still hold their activations and the ones after it have freed theirs.
        `dispatch`: the all-to-all buffers an MoE layer holds while it runs (forward, or its recompute
        in backward) under expert parallelism, part of that layer's transient only (measured: a
        recomputed stage peaks in its MoE layer's rerun, not its dense one's plus the buffers). `copies`:
        the bf16 copy of its routed-expert weights each MoE layer saves (kept, or while it reruns)."""
        mc = self.cfg.model
        mtp_rc = any(i in rc_ids for i in range(mc.num_hidden_layers, mc.num_hidden_layers + mc.num_nextn_predict_layers))
        kept, trans = self.edge(first, last, mtp_rc)
        logits = self.logits(first, mtp_rc)[0] if last else 0
        if first or not last:  # the embedding, or a middle stage's received input: the first piece
            pieces = [(kept, trans)]
            tail = []
        else:  # a last stage: its received input first, the head / MTP / loss after the layers
            pieces = [(self.input_bytes, 0)]
            tail = [(kept, trans)]
        if first and last:  # one stage holds everything: the edge run covered the embedding and the head
            pieces, tail = [(kept, 0)], [(0, trans)]
        # (kept, transient, bytes alive in the piece's forward beside its all-to-all buffers, or None: no MoE)
        moe_edge = last and mc.num_nextn_predict_layers > 0 and mc.is_moe_layer(mc.num_hidden_layers)
        pieces = [(k, t, None) for k, t in pieces]
        for i in layer_ids:
            k, t = self.layer(i, i in rc_ids)
            moe = mc.is_moe_layer(i)
            k, t = (k, t + copies) if moe and i in rc_ids else (k + copies, t) if moe else (k, t)
            pieces.append((k, t, self.forward_bytes(i) + copies if moe else None))
        if moe_edge:
            tail = [(k, t + copies) if mtp_rc else (k + copies, t) for k, t in tail]
        pieces += [(k, t, k + t if moe_edge else None) for k, t in tail]  # the MTP block's MoE: at the edge's peak
        before, peak, at_peak = 0, 0, 0
        for k, t, fwd in pieces:
            if before + k + t > peak:
                peak, at_peak = before + k + t, 0
            if fwd is not None and dispatch and before + fwd + dispatch > peak:
                peak, at_peak = before + fwd + dispatch, dispatch
            before += k
        return StageActivation(act_bytes=before, fwd_bwd_peak=max(peak, before), logits_bytes=logits,
                               dispatch_bytes=at_peak if peak > before else 0)

    def whole(self, rc_ids: set[int], loss: str, dispatch: int = 0, copies: int = 0) -> StageActivation:
        """No pipeline: the whole model in one run (one rank of tp 1), else as one stage of pieces; the
        one run's peak adds the MoE `dispatch` buffers (`stage`) whatever layer it is in."""
        L = self.cfg.model.num_hidden_layers
        if self.tp > 1:
            return self.stage(list(range(L)), True, True, rc_ids, dispatch, copies)
        a = self._run(("whole", loss, tuple(sorted(rc_ids))), list(range(L)), True, True, rc_ids, loss)
        mtp_rc = any(i in rc_ids for i in range(L, L + self.cfg.model.num_nextn_predict_layers))
        logits = 0 if loss == "fused" else self.logits(True, mtp_rc)[0]  # the fused head keeps no logits
        moe = [i for i in range(L + self.cfg.model.num_nextn_predict_layers) if self.cfg.model.is_moe_layer(i)]
        kept = copies * sum(i not in rc_ids for i in moe)
        rerun = copies if any(i in rc_ids for i in moe) else 0
        return StageActivation(a.act_bytes + kept, a.fwd_bwd_peak + kept + rerun + dispatch, logits, dispatch)
