"""DualPipe's computation / all-to-all overlap on torch's `ScheduleDualPipeV`.

DualPipeV pairs, on one rank, the forward of one micro-batch chunk with the backward of another
(the schedule's `OVERLAP_F_B` actions; torch runs the two one after the other). Here they run
together, as DeepSeek-V3 describes (§3.2.1) and torchtitan implements on CUDA: the forward in the
calling thread, the backward in a second thread, and the two take turns at four points of every
MoE layer (`sync`): A before the dispatch all-to-all, B after it, C before the combine all-to-all,
D after it. Between two turns exactly one of the threads is inside an all-to-all while the other
computes:
    forward   A | dispatch | B | experts   | C | combine  | D | attention, gate ...   | A ...
    backward  C | experts' | B | dispatch' | A | attn' ...| D | combine'              | C ...
(the backward's first D passes without a turn). So each rank issues its collectives on the ep
group in one fixed order (never from both threads at once), and while one chunk's tokens are on the
wire the other chunk computes. On gloo a collective blocks its thread while the transfer runs on
gloo's own threads and torch releases the GIL around kernels and waits, so the other thread's
kernels run meanwhile. The arithmetic of every micro-batch is unchanged and gradients accumulate in
the same order, so losses are bit-identical to the sequential schedule.

Turns are counted, not timed: with f and b MoE layers in the forward and backward chunk, both
threads take 4 min(f, b) - 1 turns (one more when b > f, so the backward's next combine waits for
the forward's last one); afterwards only one thread still has all-to-alls to run. The overlap
needs the all-to-alls to be the only collectives inside the two chunks (`overlap_blocker`).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

_local = threading.local()  # .turns_left, .skip_first_d: per thread, while an overlap runs


class _Turns:
    """Two threads alternating at the MoE sync points; inactive outside an overlapped action."""

    def __init__(self):
        self.barrier: threading.Barrier | None = None

    def point(self, name: str) -> None:
        left = getattr(_local, "turns_left", 0)
        if self.barrier is None or left <= 0:
            return
        if name == "D" and getattr(_local, "skip_first_d", False):
            _local.skip_first_d = False
            return
        _local.turns_left = left - 1
        self.barrier.wait()


TURNS = _Turns()
STATS = {"actions": 0, "turns": 0}
"""Overlapped OVERLAP_F_B actions run in this process and the turns they took (for logs and tests)."""


class _Sync(torch.autograd.Function):
    """Identity whose forward and backward are turn points."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        ctx.name = name
        TURNS.point(name)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        TURNS.point(ctx.name)
        return grad, None


def sync(x: torch.Tensor, name: str) -> torch.Tensor:
    """A turn point of the ep all-to-alls (A, B before/after dispatch; C, D before/after combine)."""
    return _Sync.apply(x, name) if torch.is_grad_enabled() else x


def overlap_blocker(dims, stages: list[nn.Module]) -> str | None:
    """Why this layout cannot overlap (other collectives inside the chunks), or None."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    if blocker := dims.overlap_blocker():
        return blocker
    if any(isinstance(m, CheckpointWrapper) for st in stages for m in st.modules()):
        return "recompute repeats the dispatch all-to-all inside the backward (train.recompute)"
    return None


def _moe_count(stage: nn.Module) -> int:
    return sum(1 for _ in stage.moe_layers())


def overlap_f_b(action, ctx) -> None:
    """`OVERLAP_F_B`: the forward sub-action here, the backward sub-action in a second thread, with the
    bookkeeping torch's runtime does for a FORWARD and a FULL_BACKWARD action."""
    from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, _wait_batch_p2p

    sched = ctx.schedule_ref
    stages = {st.stage_index: st for st in sched._stages}
    fwd, bwd = action.sub_actions
    if (fwd.computation_type, bwd.computation_type) != (FORWARD, FULL_BACKWARD):
        raise RuntimeError(f"dualpipe_overlap: expected OVERLAP_F_B = (FORWARD, FULL_BACKWARD) from torch's DualPipeV, "
                           f"got {action.sub_actions}; set parallel.dualpipe_overlap=false")
    f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
    f_mb, b_mb = fwd.microbatch_index, bwd.microbatch_index
    # the inputs: received activations / gradients (none between the two V stages of this rank)
    if not f_stage.is_first and fwd.stage_index - 1 not in stages:
        _wait_batch_p2p(sched.fwd_recv_ops.pop((fwd.stage_index, f_mb)))
    if not b_stage.is_last and bwd.stage_index + 1 not in stages:
        _wait_batch_p2p(sched.bwd_recv_ops.pop((bwd.stage_index, b_mb)))
    f_moe, b_moe = _moe_count(f_stage.submod), _moe_count(b_stage.submod)
    turns = 4 * min(f_moe, b_moe) - 1 + (b_moe > f_moe) if min(f_moe, b_moe) else 0
    TURNS.barrier = threading.Barrier(2)
    STATS["actions"] += 1
    STATS["turns"] += turns
    errors: list[BaseException] = []

    def backward() -> None:
        _local.turns_left, _local.skip_first_d = turns, True
        try:
            sched._assert_unsharded(b_stage)
            loss = sched._maybe_get_loss(b_stage, b_mb)
            sched.backward_counter[bwd.stage_index] += 1
            last = sched.backward_counter[bwd.stage_index] == sched._n_microbatches
            b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last)
            if bwd.stage_index - 1 in stages:
                stages[bwd.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)
            TURNS.barrier.abort()
        finally:
            _local.turns_left = 0

    thread = threading.Thread(target=backward, name="dualpipe-backward", daemon=True)
    _local.turns_left, _local.skip_first_d = turns, False
    thread.start()
    try:
        sched._assert_unsharded(f_stage)
        out = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb])
        sched._maybe_compute_loss(f_stage, out, ctx.target_mbs, f_mb)
        if fwd.stage_index + 1 in stages:
            stages[fwd.stage_index + 1].set_local_fwd_input(out, f_mb)
    except BaseException as e:
        TURNS.barrier.abort()
        errors.insert(0, e)
    finally:
        _local.turns_left = 0
        thread.join()
        TURNS.barrier = None
    if errors:  # the first real error (a broken turn is the other thread's failure showing)
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
