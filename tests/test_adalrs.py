"""AdaLRS: slope fit, decay of alpha'/beta', checkpointable state, and the search on a problem whose best
learning rate is known (noisy quadratic trained by SGD for a fixed budget)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sail_jax.training.adalrs import Action, AdaLRS, AdaLRSConfig, fit_slope

STEPS = 1000


def test_fit_slope_matches_least_squares_with_standard_error():
    rng = np.random.default_rng(0)
    y = 5.0 - 0.3 * np.arange(20) + rng.normal(0, 0.5, 20)
    slope, se = fit_slope(list(y))
    (ref_slope, _), cov = np.polyfit(np.arange(20), y, 1, cov="unscaled")
    resid = y - np.polyval(np.polyfit(np.arange(20), y, 1), np.arange(20))
    ref_se = math.sqrt(cov[0, 0] * np.sum(resid**2) / (20 - 2))
    assert slope == pytest.approx(ref_slope, rel=1e-10) and se == pytest.approx(ref_se, rel=1e-10)


def test_scales_decay_to_one_and_search_is_confined_to_its_window():
    ctl = AdaLRS(AdaLRSConfig(window=3, start_fraction=0.1, end_fraction=0.4), total_steps=100)
    assert ctl.alpha_prime() == 3.0 and ctl.beta_prime() == 0.5
    ctl.decisions = 200  # 0.99**200 * 3 < 1
    assert ctl.alpha_prime() == 1.0 and ctl.beta_prime() == 1.0
    ctl = AdaLRS(AdaLRSConfig(window=3, start_fraction=0.1, end_fraction=0.4), total_steps=100)
    actions, scales = [], []
    for s in range(100):
        scales.append(ctl.lr_scale())
        actions.append(ctl.observe(s, 10.0 - 0.1 * s))
    assert all(a is Action.NONE for a in actions[:12])  # nothing before 10%, then 3 baseline steps
    assert actions[12] is Action.SNAPSHOT and scales[13] == 3.0  # the first trial
    assert ctl.phase == "done" and ctl.lr_scale() == ctl.multiplier
    assert all(a is Action.NONE for a in actions[40:]) and len(set(scales[40:])) == 1


def test_state_round_trips_through_json():
    ctl = AdaLRS(AdaLRSConfig(window=3, start_fraction=0.0), total_steps=50)
    for s in range(7):
        ctl.observe(s, 5.0 - 0.2 * s)
    other = AdaLRS(AdaLRSConfig(window=3, start_fraction=0.0), total_steps=50)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    for s in range(7, 30):
        assert ctl.observe(s, 4.0 - 0.01 * s) == other.observe(s, 4.0 - 0.01 * s)
    assert other.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        other.load_state_dict({"bogus": 1})


def sgd_run(lr: float, seed: int, adalrs: bool) -> tuple[float, float]:
    """(final loss, final learning rate) of SGD on f(x) = 1/2 sum h x^2 with noisy gradients; the final loss is
    the mean noise-free f over the last 50 steps, the controller sees a noisy estimate (as a minibatch loss).
    Snapshots / rollbacks copy x exactly as the trainer copies params + optimizer state."""
    rng = np.random.default_rng(seed)
    h = np.linspace(0.5, 1.0, 16)
    x = np.full(16, 3.0)
    ctl = AdaLRS(AdaLRSConfig(window=10), STEPS) if adalrs else None
    snapshot, losses = None, []
    for step in range(STEPS):
        scale = ctl.lr_scale() if ctl else 1.0
        losses.append(0.5 * np.sum(h * x * x))
        x = x - lr * scale * (h * x + 0.05 * rng.standard_normal(16))
        if ctl:
            action = ctl.observe(step, float(losses[-1] + 0.01 * rng.standard_normal()))
            if action is Action.SNAPSHOT:
                snapshot = x.copy()
            elif action is Action.ROLLBACK:
                x, snapshot = snapshot, None
    return float(np.mean(losses[-50:])), lr * (ctl.multiplier if ctl else 1.0)


@pytest.mark.parametrize("start_lr", [1e-3, 1.9])  # too small (slow descent) / too large (high noise floor)
def test_search_moves_the_rate_towards_the_best_one(start_lr):
    sweep = {lr: sgd_run(lr, 0, adalrs=False)[0] for lr in np.geomspace(1e-3, 1.9, 12)}
    best = min(sweep, key=sweep.get)
    assert 3e-3 < best < 0.1  # an interior optimum for this budget: slower below, a higher noise floor above
    fixed_loss, _ = sgd_run(start_lr, 0, adalrs=False)
    for seed in range(3):
        loss, lr = sgd_run(start_lr, seed, adalrs=True)
        assert abs(math.log(lr / best)) < 0.75 * abs(math.log(start_lr / best)), (seed, lr, best)
        assert loss < 0.1 * fixed_loss, (seed, loss, fixed_loss)
