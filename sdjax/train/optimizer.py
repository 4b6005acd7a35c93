"""AdamW with warmup and a cosine or constant schedule, and global-norm clipping."""

from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to end_factor x lr, or constant."""
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule {opt.schedule!r} is unknown; known: {', '.join(SCHEDULES)}")
    lr, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=lr * opt.end_factor)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of a run (gradients arrive unclipped; clipping is part of the chain)."""
    adamw = optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay)
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
    return adamw
