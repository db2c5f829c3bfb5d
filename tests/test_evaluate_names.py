"""The names evaluate gives models (report.md, plots, metrics.json, tb/<name>): short, readable, unique."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.eval import compounding


def export(path: str, kind: str = "teacher", preset: str | None = None) -> SimpleNamespace:
    """What the naming reads of an export: its folder and its recorded kind and preset."""
    return SimpleNamespace(path=Path(path), info=SimpleNamespace(kind=kind, preset=preset))


TEACHER = export("runs/pretrain/shakespeare-20261201-192426/best", "teacher", "shakespeare")
STUDENT = export("runs/distill/one_head-20261201-202424/best", "student", "one_head")


@pytest.mark.parametrize(
    ("exports", "expected"),
    [
        ([TEACHER, STUDENT], ["shakespeare", "one_head"]),  # the run folder's preset, without its timestamp
        ([export("runs/guide-char/causal"), export("runs/guide-char/nomask/last")], ["causal", "nomask"]),
        (  # a teacher and a student of one preset stay distinct
            [
                export("runs/pretrain/tiny-20261202-024941/best"),
                export("runs/distill/tiny-20261202-025131/best", "student"),
            ],
            ["tiny-teacher", "tiny-student"],
        ),
        (  # one run's two exports
            [TEACHER, export("runs/pretrain/shakespeare-20261201-192426/last")],
            ["shakespeare-best", "shakespeare-last"],
        ),
        (  # two runs of one preset, alike in kind and export: a numeric suffix
            [TEACHER, export("runs/pretrain/shakespeare-20261202-101010/best")],
            ["shakespeare", "shakespeare-2"],
        ),
    ],
)
def test_derived_names_are_short_readable_and_unique(exports, expected):
    names, judge = compounding.model_names((), exports)
    assert names == expected and judge is None


def test_long_names_are_cut_to_fit_and_still_told_apart():
    long = "a_very_long_experiment_name_for_a_student_run"
    exports = [export(f"runs/x/{long}/best"), export(f"runs/x/{long}/last")]
    names, _ = compounding.model_names((), exports)
    assert all(len(n) <= compounding.MAX_NAME for n in names) and len(set(names)) == 2
    assert names[0].endswith("-best") and names[1].endswith("-last") and names[0].startswith("a_very_long")
    assert compounding.short_name(export("runs/x/odd name!-20261201-192426")) == "odd_name"


def test_given_names_are_kept_and_a_judge_outside_the_models_gets_its_own():
    names, judge = compounding.model_names(("teacher", "student"), [TEACHER, STUDENT])
    assert names == ["teacher", "student"] and judge is None
    names, _ = compounding.model_names(("a", "a"), [TEACHER, STUDENT])
    assert names == ["a", "a-2"]  # repeated --names get a suffix, as before
    # --teacher T outside --models: the student alone would be "tiny"; both stay distinct.
    student = export("runs/distill/tiny-20261202-025131/best", "student")
    names, judge = compounding.model_names((), [student], export("runs/pretrain/tiny-20261202-024941/best"))
    assert names == ["tiny-student"] and judge == "tiny-teacher"
    names, judge = compounding.model_names(
        ("tiny",), [student], export("runs/pretrain/tiny-20261202-024941/best")
    )
    assert names == ["tiny"] and judge == "tiny-2"


def test_phases_name_every_step_of_one_model():
    from pipeline.eval.config import EvaluateConfig

    cfg = EvaluateConfig(rollouts=("greedy", "sampled"))
    assert compounding.phases(cfg, judged=False) == [
        "teacher-forced",
        "greedy rollouts",
        "sampled rollouts",
        "attention",
    ]
    judged = compounding.phases(cfg, judged=True)
    assert judged[1:5] == ["greedy rollouts", "judge on greedy", "sampled rollouts", "judge on sampled"]
