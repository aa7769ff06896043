"""AdaLRS (SAIL-VL2 paper Eq. 1; AdaLRS, arXiv 2506.13274): loss-slope-guided search of the learning-rate multiplier.

A host-side controller; the trainer multiplies the scheduled learning rate by `lr_scale()` and carries out
the returned actions (snapshot / roll back / release the snapshot of params + optimizer state).

Cycle, only while the step lies in [start_fraction, end_fraction) of training:
1. baseline: k steps at the current multiplier m; least-squares fit of loss vs step gives the descent rate
   v = -slope and its standard error.
2. trial: snapshot, then k steps at alpha' * m with alpha' = max(lambda^t * alpha, 1) (t = decisions so far).
   With e = sqrt(se_baseline^2 + se_trial^2) (the standard error of the slope difference):
   - v_trial > v_base + 2e: keep the trial's parameters and m <- alpha' * m; the trial window is the baseline
     of the next trial;
   - v_trial < v_base - 2e: roll back params AND optimizer state to the snapshot, m <- beta' * m with
     beta' = 1 / max(lambda^t * beta, 1);
   - otherwise keep the parameters and m.
From the AdaLRS paper: a trial whose loss exceeds the historical maximum (or is not finite) is stopped and
rolled back at once; a baseline whose loss rises (v < -2 se) over two consecutive windows lowers m by beta'.
After `end_fraction` (an unfinished trial keeps its parameters but not its multiplier) the multiplier found
stays fixed and the base schedule applies.
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class AdaLRSConfig:
    """Our choices (the papers leave them open): alpha 3, beta 2, lambda 0.99, k 100, active during 10-40%."""

    alpha: float = 3.0
    beta: float = 2.0
    decay: float = 0.99  # lambda
    window: int = 100  # k
    start_fraction: float = 0.1
    end_fraction: float = 0.4

    def __post_init__(self):
        if self.alpha <= 1 or self.beta <= 1 or not 0 < self.decay <= 1 or self.window < 3:
            raise ValueError(f"AdaLRSConfig needs alpha, beta > 1, decay in (0, 1], window >= 3; got {self}")
        if not 0 <= self.start_fraction < self.end_fraction <= 1:
            raise ValueError(f"AdaLRSConfig needs 0 <= start_fraction < end_fraction <= 1; got {self}")


class Action(Enum):
    NONE = "none"
    SNAPSHOT = "snapshot"  # copy params + optimizer state now (before the next step)
    ROLLBACK = "rollback"  # restore the snapshot now, then drop it
    RELEASE = "release"  # drop the snapshot, keep the current state


def fit_slope(losses: list[float]) -> tuple[float, float]:
    """(slope, standard error of the slope) of an ordinary least-squares line through losses[i] at x = i."""
    y = np.asarray(losses, np.float64)
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    sxx = float(np.sum(x * x))
    slope = float(np.sum(x * (y - y.mean())) / sxx)
    resid = y - y.mean() - slope * x
    se = math.sqrt(float(np.sum(resid * resid)) / (len(y) - 2) / sxx)
    return slope, se


class AdaLRS:
    """The controller. `observe(step, loss)` after each completed step; `lr_scale()` before each step."""

    def __init__(self, cfg: AdaLRSConfig, total_steps: int):
        self.cfg = cfg
        self.start = int(cfg.start_fraction * total_steps)
        self.end = int(cfg.end_fraction * total_steps)
        self.multiplier = 1.0
        self.decisions = 0  # t
        self.phase = "baseline"  # baseline | trial | done
        self.window: list[float] = []
        self.baseline: tuple[float, float] | None = None  # (descent rate, standard error)
        self.rising_windows = 0
        self.history_max = -math.inf
        self.trial_scale = 1.0
        self.snapshot_step: int | None = None
        self.events: list[dict[str, Any]] = []

    def alpha_prime(self) -> float:
        return max(self.cfg.decay**self.decisions * self.cfg.alpha, 1.0)

    def beta_prime(self) -> float:
        return 1.0 / max(self.cfg.decay**self.decisions * self.cfg.beta, 1.0)

    def lr_scale(self) -> float:
        return self.multiplier * (self.trial_scale if self.phase == "trial" else 1.0)

    def _decide(self, step: int, kind: str, new_multiplier: float) -> None:
        self.events.append({"step": step, "decision": kind, "from": self.multiplier, "to": new_multiplier,
                            "snapshot_step": self.snapshot_step})
        self.multiplier = new_multiplier
        self.decisions += 1

    def _start_trial(self, step: int) -> Action:
        self.phase, self.window = "trial", []
        self.trial_scale = self.alpha_prime()
        self.snapshot_step = step + 1
        return Action.SNAPSHOT

    def _restart_baseline(self) -> None:
        self.phase, self.window, self.baseline, self.trial_scale, self.snapshot_step = "baseline", [], None, 1.0, None

    def observe(self, step: int, loss: float) -> Action:
        """`step` is the 0-based index of the step that just produced `loss`."""
        if self.phase == "done":
            return Action.NONE
        if step + 1 >= self.end:
            was_trial = self.phase == "trial"
            self._restart_baseline()
            self.phase = "done"
            return Action.RELEASE if was_trial else Action.NONE
        if step < self.start:
            if math.isfinite(loss):
                self.history_max = max(self.history_max, loss)
            return Action.NONE
        if self.phase == "trial":
            return self._observe_trial(step, loss)
        if math.isfinite(loss):
            self.history_max = max(self.history_max, loss)
            self.window.append(loss)
        if len(self.window) < self.cfg.window:
            return Action.NONE
        descent, se = fit_slope(self.window)
        descent = -descent
        self.window = []
        if descent < -2 * se:  # the loss rises
            self.rising_windows += 1
            if self.rising_windows >= 2:
                self._decide(step, "lower_on_rising_loss", self.multiplier * self.beta_prime())
                self.rising_windows = 0
            return Action.NONE
        self.rising_windows = 0
        self.baseline = (descent, se)
        return self._start_trial(step)

    def _observe_trial(self, step: int, loss: float) -> Action:
        if not math.isfinite(loss) or loss > self.history_max:
            self._decide(step, "rollback_loss_above_max", self.multiplier * self.beta_prime())
            self._restart_baseline()
            return Action.ROLLBACK
        self.window.append(loss)
        if len(self.window) < self.cfg.window:
            return Action.NONE
        descent, se = fit_slope(self.window)
        descent = -descent
        base, base_se = self.baseline
        e = math.sqrt(se * se + base_se * base_se)
        if descent > base + 2 * e:
            self._decide(step, "keep_raised", self.multiplier * self.trial_scale)
            self.baseline = (descent, se)
            self.history_max = max(self.history_max, max(self.window))
            return self._start_trial(step)
        if descent < base - 2 * e:
            self._decide(step, "rollback_slower", self.multiplier * self.beta_prime())
            self._restart_baseline()
            return Action.ROLLBACK
        self._decide(step, "keep_unchanged", self.multiplier)
        self.history_max = max(self.history_max, max(self.window))
        self._restart_baseline()
        return Action.RELEASE

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("cfg", "start", "end")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"AdaLRS state has unknown keys {sorted(unknown)}")
        for k, v in state.items():
            setattr(self, k, tuple(v) if k == "baseline" and v is not None else v)
