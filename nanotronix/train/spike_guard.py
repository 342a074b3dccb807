"""Skip the update of a step whose loss or gradient norm spikes far above the recent steps' (`train.spike_skip_sigma`).

One bad batch can throw a long run off for thousands of steps, and by the time anyone looks the damage is in every
checkpoint since. OLMo 2 trained with this guard (OLMo-core's skip-step AdamW: 6 sigma over the last 128 steps):
a step whose loss or gradient norm is more than `sigma` standard deviations above the mean of the last `window`
steps' is not applied (weights, AdamW moments and step count stay as they are, like a step in `train.skip_steps`),
the run goes on with the next batch, and the console and metrics say so. A window whose values are all equal
(standard deviation 0) gives nothing to measure against: it judges no step a spike. The values of every finite step
enter the window, the skipped ones included, so a lasting change of level (a new data stage) becomes the norm after a
few steps instead of being refused forever. The guard waits until the window is full.

Exact on resume: the window is saved in every checkpoint (`state_dict`, the manifest's `trainer_state`) and
restored, so a resumed run skips the same steps as an uninterrupted one. The loss and the gradient norm are global
(the same on every rank), so every rank decides the same. Hand-written: torch has no such optimizer wrapper, and
the decision needs the step's global loss, which only the training step knows.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Optional

from nanotronix.errors import UserError


class SpikeGuard:
    def __init__(self, sigma: float, window: int, state: Optional[dict[str, Any]] = None):
        self.sigma = sigma
        self.window = window
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        if state:
            self.losses.extend(_saved_window(state, "losses"))
            self.grad_norms.extend(_saved_window(state, "grad_norms"))

    def judge(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why this step's update should be skipped (None: apply it); then add its values to the window."""
        reason = None
        if len(self.losses) == self.window:
            for name, value, seen in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.grad_norms)):
                # exact statistics (statistics rounds once, at the end): a window of one repeated value has std 0
                # and judges nothing, where sum()/len() put the mean of [0.1] * 3 1 ulp off 0.1, a std of 1e-17,
                # and any later value above 0.1 a spike of 1e14 sigma
                # (pstdev given the mean squares the float deviations, which underflow to 0 below ~1e-154)
                mean = statistics.mean(seen)
                std = statistics.pstdev(seen)
                if std > 0 and value > mean + self.sigma * std:
                    z = (value - mean) / std
                    reason = (f"{name} {value:.4g} is {z:.1f} sigma above the last {self.window} steps' "
                              f"({mean:.4g} +- {std:.2g})")
                    break
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        return reason

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}


def _saved_window(state: Any, key: str) -> list[float]:
    """A window as `state_dict` saved it (in the checkpoint's trainer_state): finite numbers only, as only finite steps
    enter it. One edited into anything else is a UserError, not a TypeError at the first step it is judged against."""
    values = state.get(key) if isinstance(state, dict) else None
    if not isinstance(values, list) or not all(type(v) in (int, float) and math.isfinite(v) for v in values):
        raise UserError(f"the checkpoint's trainer_state.spike_guard.{key} is damaged: not a list of finite numbers",
                        every_rank=True)  # the same checkpoint on every rank: rank 0 says it
    return values
