"""Distillation on 2 CPU ranks (DDP over gloo) matches 1 rank with the same global batch."""

from __future__ import annotations

import pytest
from conftest import ROOT, accelerate_launch, read_jsonl, run_recipe

ENV = {"PYTHONPATH": str(ROOT)}
FP32 = ("--train.precision", "no", "--train.no-progress")


def test_two_ranks_match_one_rank(tiny_teacher, char_data, tmp_path):
    common = [
        "--teacher",
        str(tiny_teacher),
        "--data",
        str(char_data),
        "--preset",
        "tiny",
        "--max-steps",
        "10",
    ]
    common += ["--kd.attention-weight", "0.1", *FP32]
    run_recipe("distill", *common, "--out", str(tmp_path / "one"), "--train.micro-batch-size", "4", env=ENV)
    run_recipe(
        "distill",
        *common,
        "--out",
        str(tmp_path / "two"),
        "--train.micro-batch-size",
        "2",
        launcher=accelerate_launch("cpu_ddp.yaml"),
        env=ENV,
    )
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for key in ("loss", "ce", "soft", "attention", "val_loss", "val_agree_top1", "val_kl"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-5), key
