"""Config drift on resume: exactness-breaking changes are refused with the fields listed, named ones are amendments."""

from __future__ import annotations

import json

from conftest import read_jsonl, run_recipe

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

    typo = pretrain(char_data, out, "--train.resume", "auto", "--train.amend", "optim.lrr", check=False)
    assert typo.returncode == 2 and "did you mean 'optim.lr'" in typo.stderr

    # Budgets and intervals change freely; a named change is an amendment, the original config kept.
    pretrain(char_data, out, "--train.resume", "auto", "--train.stop-at", "10", "--train.log-interval", "5")
    assert not (out / "amendments.json").exists()
    assert (out / "config.original.json").read_bytes().strip() == original.strip()
    pretrain(char_data, out, "--train.resume", "auto", "--optim.lr", "0.002", "--train.amend", "optim.lr")
    amendments = json.loads((out / "amendments.json").read_text())
    assert len(amendments) == 1 and amendments[0]["changes"] == {"optim.lr": {"saved": 0.001, "now": 0.002}}
    assert amendments[0]["resumed_from"].endswith("step_0000010")
    assert (out / "config.original.json").read_bytes().strip() == original.strip()
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.002
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 20
