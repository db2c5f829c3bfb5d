"""The learning-rate range test: its curve analysis on a problem with a known stable range, and
recipes/lr_find.py end to end with the tiny preset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import read_jsonl, run_recipe

from pipeline.studies import lr_find


def noisy_quadratic_range_test(seed: int, diverge: float = 4.0, beta: float = 0.9):
    """Gradient descent on 0.5 sum(lam_i w_i^2), lam in [0.1, 10], with the recipe's schedule and stop rule.

    Plain gradient descent is stable exactly for lr < 2 / max(lam) = 0.2.
    """
    rng = np.random.default_rng(seed)
    lam, w = np.geomspace(0.1, 10.0, 20), np.ones(20)
    lrs, losses = lr_find.exp_lrs(1e-5, 10.0, 200), []
    lowest, average = math.inf, 0.0
    for step, lr in enumerate(lrs):
        losses.append(0.5 * np.sum(lam * w * w) * (1 + 0.05 * rng.standard_normal()))
        w = w - lr * (lam * w + 0.01 * rng.standard_normal(20))
        average = beta * average + (1 - beta) * losses[-1]
        smoothed = average / (1 - beta ** (step + 1))
        if smoothed > diverge * lowest:
            break
        lowest = min(lowest, smoothed)
    return lrs[: len(losses)], losses


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rule", ["steepest", "valley"])
def test_suggestion_lies_in_the_known_stable_range(seed, rule):
    lrs, losses = noisy_quadratic_range_test(seed)
    assert lrs[-1] > 0.2  # the test ran past the stability limit and stopped on divergence
    got = lr_find.suggest_lr(lrs, lr_find.smooth(losses, 0.9, centered=True), rule)
    assert got["falling"]
    assert 0.2 / 100 < got["suggested_lr"] < 0.2  # useful (the loss moves) and stable


def test_centered_smoothing_has_no_lag():
    ramp = np.arange(100, dtype=float)
    causal = lr_find.smooth(ramp, 0.9)
    centered = lr_find.smooth(ramp, 0.9, centered=True)
    assert 50 - causal[50] > 8  # lags by about beta / (1 - beta) = 9 points
    assert centered[50] == pytest.approx(50, abs=0.5)
    assert np.allclose(lr_find.smooth(np.full(10, 3.0), 0.9, centered=True), 3.0)


def test_lr_find_recipe_suggests_a_rate_that_trains(char_data, tmp_path):
    out = tmp_path / "lr"
    proc = run_recipe(
        "lr_find",
        *["--preset", "tiny", "--data", str(char_data), "--out", str(out)],
        *["--max-steps", "80", "--train.no-progress"],
        timeout=120,
    )
    result = json.loads((out / "result.json").read_text())
    records = read_jsonl(out / "metrics.jsonl")
    lrs = [r["lr"] for r in records]
    assert len(records) == result["steps"] and np.all(np.diff(lrs) > 0)
    assert lrs[0] == pytest.approx(1e-6) and np.allclose(np.diff(np.log(lrs)), np.log(lrs[1] / lrs[0]))
    assert result["rule"] == "steepest" and result["falling"]
    assert 1e-6 < result["suggested_lr"] < result["min_loss_lr"]
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    assert "suggested learning rate" in proc.stdout

    def val_loss(lr: float) -> float:
        run = tmp_path / f"pretrain-{lr:g}"
        run_recipe(
            "pretrain",
            *["--preset", "tiny", "--data", str(char_data), "--out", str(run), "--max-steps", "30"],
            *["--optim.lr", f"{lr:g}", "--optim.min-lr", "0", "--train.no-progress"],
        )
        return json.loads((run / "result.json").read_text())["final_val_loss"]

    # Stable and useful: training at the suggestion beats the preset's 1e-3 over the same steps.
    suggested, preset = val_loss(result["suggested_lr"]), val_loss(1e-3)
    assert math.isfinite(suggested) and suggested < preset


@pytest.mark.parametrize(
    ("train", "says"),
    [
        ({"resume": "auto"}, "a range test does not resume"),
        ({"max_tokens": 5000}, "--max-steps is the number of learning rates tried"),
        ({"max_epochs": 0.5}, "--max-steps is the number of learning rates tried"),
    ],
)
def test_training_settings_the_range_test_does_not_take_are_refused(train, says):
    """They were accepted and ignored (resume), or cut the run below --max-steps learning rates,
    past the check that there are at least 10 (max-tokens, max-epochs)."""
    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError
    from pipeline.studies.config import LRFindConfig

    with pytest.raises(ConfigError, match=says):
        LRFindConfig(train=TrainConfig(max_steps=100, **train))
    LRFindConfig(train=TrainConfig(max_steps=100))  # the default stands
