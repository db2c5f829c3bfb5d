"""Config drift on resume: exactness-breaking changes are refused with the fields listed, named ones are amendments."""

from __future__ import annotations

import json

import pytest
from conftest import read_jsonl, run_recipe

from pipeline.errors import UsageError
from pipeline.run.folder import RunDir
from pipeline.train.stage import check_resume_config

FP32 = ("--train.precision", "no", "--train.no-progress")


def pretrain(data, out, *args, check=True):
    common = ("--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "20")
    return run_recipe("pretrain", *common, "--train.eval-interval", "5", *FP32, *args, check=check)


def test_changed_settings_are_refused_and_named_ones_recorded(char_data, tmp_path):
    out = tmp_path / "run"
    pretrain(char_data, out, "--train.stop-at", "5")
    original = (out / "config.json").read_bytes()

    refused = pretrain(
        char_data, out, "--train.resume", "auto", "--optim.lr", "0.002", "--train.seed", "7", check=False
    )
    assert refused.returncode == 2
    assert "would break exactness" in refused.stderr
    assert "optim.lr: saved 0.001, now 0.002" in refused.stderr and "train.seed" in refused.stderr
    assert "--train.amend optim.lr train.seed" in refused.stderr
    assert (out / "config.json").read_bytes() == original  # nothing overwritten
    assert not (out / "amendments.json").exists()

    # A named change is an amendment; budgets and intervals change freely; the original config is kept.
    pretrain(char_data, out, "--train.resume", "auto", "--optim.lr", "0.002", "--train.amend", "optim.lr",
             "--train.log-interval", "5")  # fmt: skip
    amendments = json.loads((out / "amendments.json").read_text())
    assert len(amendments) == 1 and amendments[0]["changes"] == {"optim.lr": {"saved": 0.001, "now": 0.002}}
    assert amendments[0]["resumed_from"].endswith("step_0000005")
    assert (out / "config.original.json").read_bytes().strip() == original.strip()
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["lr"] == 0.002 and config["train"]["log_interval"] == 5
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")][-1] == 20


def _saved_run(tmp_path, config):
    run = RunDir(tmp_path / "run")
    (run.path / "config.json").write_text(json.dumps(config))
    return run


CONFIG = {"optim": {"lr": 0.001}, "train": {"max_steps": 20, "seed": 1, "eval_interval": 5}, "out": "a"}


def test_budgets_and_intervals_change_freely_and_keep_the_first_config(tmp_path):
    run = _saved_run(tmp_path, CONFIG)
    now = CONFIG | {"train": {"max_steps": 40, "seed": 1, "eval_interval": 10}, "out": "b"}
    check_resume_config(run, now, tmp_path / "run/states/step_0000005", ())
    assert not (run.path / "amendments.json").exists()
    assert json.loads((run.path / "config.original.json").read_text()) == CONFIG
    check_resume_config(run, now, None, ())  # a fresh run compares nothing


def test_amend_names_must_exist_and_unnamed_changes_are_listed(tmp_path):
    run = _saved_run(tmp_path, CONFIG)
    with pytest.raises(UsageError, match=r"--train.amend names optim.lrr.*did you mean 'optim.lr'"):
        check_resume_config(run, CONFIG, tmp_path / "state", ("optim.lrr",))
    drift = CONFIG | {"optim": {"lr": 0.002}, "data": {"dir": "elsewhere"}}
    with pytest.raises(
        UsageError, match=r"data.dir: saved None, now 'elsewhere'; optim.lr: saved 0.001, now 0.002"
    ):
        check_resume_config(run, drift, tmp_path / "state", ("train.seed",))
    check_resume_config(run, drift, tmp_path / "state", ("optim.lr", "data.dir"))
    changes = json.loads((run.path / "amendments.json").read_text())[0]["changes"]
    assert changes == {
        "data.dir": {"saved": None, "now": "elsewhere"},
        "optim.lr": {"saved": 0.001, "now": 0.002},
    }
