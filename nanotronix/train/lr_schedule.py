"""Warmup-stable-decay (WSD) learning rate as a pure function of the optimizer step.

Nothing about the schedule is stored, so a resume (in any layout) can never get the learning rate wrong.
Step s (1-based) gets:
  warm-up  s <= warmup_steps:                 lr * s / warmup_steps   (linear; peak reached at s = warmup_steps)
  stable   up to decay_start_step:            lr
  decay    s in (decay_start, decay_start + decay_steps]: from lr down to min_lr (linear, cosine or 1-sqrt)
  after the decay:                            min_lr
"""
from __future__ import annotations

import math

from nanotronix.config import LRScheduleConfig


def lr_at(step: int, peak_lr: float, sched: LRScheduleConfig) -> float:
    if sched.warmup_steps > 0 and step <= sched.warmup_steps:
        # step / warmup_steps first: exactly 1.0 at the end of warm-up, so that step gets the peak itself (peak * step
        # / warmup_steps may round to 1 ulp off it, above it too)
        return peak_lr * (step / sched.warmup_steps)
    if sched.decay_start_step is None or step <= sched.decay_start_step:
        return peak_lr
    progress = min(1.0, (step - sched.decay_start_step) / sched.decay_steps)
    if sched.decay_style == "linear":
        factor = 1.0 - progress
    elif sched.decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # "1-sqrt" (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Durations")
        factor = 1.0 - math.sqrt(progress)
    return sched.min_lr + (peak_lr - sched.min_lr) * factor


def schedule_note(sched: LRScheduleConfig, train_steps: int) -> str | None:
    """A note when the run ends before its schedule does (a short test run that kept a long run's schedule: its
    learning rate never reaches the peak, or never decays), or goes on after a decay to 0; None otherwise. Only a note:
    a run continued later with more steps (a WSD run's stable phase) ends before its decay on purpose."""
    if sched.warmup_steps > train_steps:
        return (f"lr_schedule.warmup_steps={sched.warmup_steps} is beyond train.train_steps={train_steps}: the "
                f"learning rate never reaches optimizer.lr (set lr_schedule.* for a short run)")
    if sched.decay_start_step is not None and sched.decay_start_step + sched.decay_steps > train_steps:
        return (f"the learning rate decays until step {sched.decay_start_step + sched.decay_steps}, after "
                f"train.train_steps={train_steps}: this run stops before the end of its decay")
    if sched.decay_start_step is not None and sched.min_lr == 0 and sched.decay_start_step + sched.decay_steps < \
            train_steps:
        end = sched.decay_start_step + sched.decay_steps
        return (f"the learning rate decays to 0 at step {end}: steps {end + 1}-{train_steps} (train.train_steps) "
                "train at learning rate 0 and change nothing but the optimizer's moments")
    return None
