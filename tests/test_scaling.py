"""Batch-size studies: the study's arithmetic, and recipes/scaling.py end to end with the tiny preset."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import read_jsonl, run_recipe

from pipeline.studies import scaling

# --------------------------------------------------------------------------------------------------
# Unit: learning-rate rules, targets, the critical-batch fit
# --------------------------------------------------------------------------------------------------


def test_lr_rules():
    assert scaling.scaled_lr(1e-3, 64, 16, "none") == 1e-3
    assert scaling.scaled_lr(1e-3, 64, 16, "linear") == pytest.approx(4e-3)
    assert scaling.scaled_lr(1e-3, 64, 16, "sqrt") == pytest.approx(2e-3)
    assert scaling.scaled_lr(1e-3, 4, 16, "sqrt") == pytest.approx(5e-4)


def test_critical_batch_fit_recovers_known_curve():
    batch = np.array([8, 16, 32, 64, 128, 256])
    steps = 1000 * (1 + 48 / batch)  # S_min = 1000, B_crit = 48
    fit = scaling.fit_critical_batch(batch, steps)
    assert fit["s_min"] == pytest.approx(1000, rel=1e-6)
    assert fit["b_crit"] == pytest.approx(48, rel=1e-6)
    # Perfect scaling everywhere (B << B_crit) has no finite B_crit; one batch size has no fit.
    assert scaling.fit_critical_batch(batch, 5000 / batch) is None
    assert scaling.fit_critical_batch([8], [100]) is None


def curve(steps, losses, tokens_per_step=100):
    steps = np.array(steps, dtype=float)
    return scaling.Curve(
        steps, steps * tokens_per_step, steps / 10, np.array(losses, dtype=float), np.array([]), np.array([])
    )


def test_reach_target_interpolates_between_evaluations():
    c = curve([10, 20, 30], [3.0, 2.0, 1.5])
    hit = scaling.reach_target(c, 2.5)
    assert hit == {"steps": 15.0, "tokens": 1500.0, "seconds": 1.5}
    assert scaling.reach_target(c, 3.5)["steps"] == 10  # reached at the first evaluation
    assert scaling.reach_target(c, 1.0) is None
    assert scaling.default_target([c, curve([10, 20], [2.8, 2.2])]) == 2.2


# --------------------------------------------------------------------------------------------------
# Integration: a real study, then a re-run that trains nothing
# --------------------------------------------------------------------------------------------------

BATCHES = (4, 8, 16)  # the tiny preset's micro-batch is 4: accumulation 1, 2, 4


@pytest.fixture(scope="module")
def study(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    args = ["--preset", "tiny", "--data", str(char_data), "--out", str(out)]
    args += ["--batch-sizes", *map(str, BATCHES), "--max-steps", "16", "--evals", "4", "--no-progress"]
    first = run_recipe("scaling", *args, timeout=240)
    return out, args, first


def test_study_writes_table_plots_and_tensorboard(study):
    out, _, first = study
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["batch_size"]) for r in rows] == list(BATCHES)
    for row, batch in zip(rows, BATCHES):
        run = out / f"bs{batch}"
        result = json.loads((run / "result.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert float(row["final_val_loss"]) == pytest.approx(result["final_val_loss"])
        assert int(row["steps"]) == 16 and int(row["tokens"]) == 16 * batch * 32
        assert config["train"]["seed"] == 1337  # same initial weights and data order in every run
        assert config["train"]["micro_batch_size"] * config["train"]["grad_accum_steps"] == batch
        assert config["optim"]["lr"] == pytest.approx(1e-3 * math.sqrt(batch / 4), rel=1e-5)  # sqrt rule
        assert float(row["peak_mem_gib"]) > 0 and float(row["tokens_per_s"]) > 0
        measured = [r for r in read_jsonl(run / "metrics.jsonl") if "noise/b_simple" in r]
        if batch == 4:  # no accumulation: nothing to compare the micro-batch gradient with
            assert result["noise_scale"] is None and not measured and row["b_simple"] == ""
        else:
            assert result["noise_scale"]["b_simple"] > 0 and measured
    summary = json.loads((out / "result.json").read_text())
    target = summary["target_loss"]
    assert target == pytest.approx(max(r["best_val_loss"] for r in summary["rows"]))
    assert all(r["steps_to_target"] is not None for r in summary["rows"])
    for name in ("val_loss_vs_tokens", "steps_to_target", "wall_time"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| batch |" in (out / "summary.md").read_text()
    for batch in BATCHES:
        assert list((out / "tb" / f"bs{batch}").glob("events.out.tfevents.*"))
    assert "Target val loss" in first.stdout


def test_rerun_skips_finished_runs(study):
    out, args, _ = study
    stamps = {b: (out / f"bs{b}" / "result.json").stat().st_mtime_ns for b in BATCHES}
    metrics = {b: (out / f"bs{b}" / "metrics.jsonl").read_text() for b in BATCHES}
    again = run_recipe("scaling", *args, timeout=120)
    for b in BATCHES:
        assert f"bs{b}: finished earlier" in again.stdout and "skipped" in again.stdout
        assert (out / f"bs{b}" / "result.json").stat().st_mtime_ns == stamps[b]
        assert (out / f"bs{b}" / "metrics.jsonl").read_text() == metrics[b]
    assert "0 of 3 runs to train" in again.stdout
    assert (out / "summary.csv").is_file()


def test_bad_input_is_refused_before_any_run(study, char_data, tmp_path):
    _, args, _ = study
    changed = [a if a != "16" else "17" for a in args]  # another budget into the same study folder
    proc = run_recipe("scaling", *changed, check=False, timeout=60)
    assert proc.returncode == 2 and "error:" in proc.stderr and "other flags" in proc.stderr
    proc = run_recipe(
        "scaling",
        *["--preset", "tiny", "--data", str(char_data), "--out", str(tmp_path / "x")],
        *["--batch-sizes", "4", "--max-steps", "2", "--run-args=--optim.lr 0.1"],
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "--base-lr" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_distill_study_takes_the_teachers_windows_and_batch(tiny_teacher):
    """`--stage distill --preset one_head` leaves seq_len and the micro-batch at 0: the teacher's (32, 4)."""
    import importlib.util

    from conftest import ROOT

    from pipeline.studies.config import ScalingConfig

    spec = importlib.util.spec_from_file_location("scaling_recipe", ROOT / "recipes" / "scaling.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = ScalingConfig(
        stage="distill", preset="one_head", teacher=str(tiny_teacher), batch_sizes=[4, 8], max_tokens=2048
    )
    stage_cfg = recipe.stage_config(cfg)
    assert (stage_cfg.data.seq_len, stage_cfg.train.micro_batch_size) == (32, 4)
    args, steps = recipe.plan_run(cfg, stage_cfg, 8, 1, "")
    assert steps == 2048 // (8 * 32)
    assert args[args.index("--train.micro-batch-size") + 1] == "4"


def test_run_args_win_over_the_studys_defaults_and_cannot_change_what_it_owns(char_data):
    """--run-args came before every flag of the study, so its --train.keep-states or
    --train.log-interval were silently reset; the study's own settings are refused instead."""
    import importlib.util

    from conftest import ROOT

    from pipeline import cli
    from pipeline.config import PretrainConfig
    from pipeline.errors import UsageError
    from pipeline.studies.config import ScalingConfig
    from teachers import PRESETS

    spec = importlib.util.spec_from_file_location("scaling_recipe", ROOT / "recipes" / "scaling.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = ScalingConfig(
        preset="tiny", data=str(char_data), batch_sizes=[4], max_steps=20,
        run_args="--train.keep-states 3 --train.log-interval 7 --train.progress",
    )  # fmt: skip
    args, _ = recipe.plan_run(cfg, recipe.stage_config(cfg), 4, 1, str(char_data))
    run = cli.parse(PretrainConfig, PRESETS, args)
    assert (run.train.keep_states, run.train.log_interval, run.train.progress) == (3, 7, True)
    assert run.train.early_stop_patience == 0 and run.train.max_steps == 20
    for owned in ("--train.early-stop-patience 5", "--train.no-noise-scale"):
        with pytest.raises(UsageError, match="--run-args must not set"):
            recipe.stage_config(dataclasses.replace(cfg, run_args=owned))
