"""launch/quickstart.sh (its command-line contract), the summary it ends with, and runs/latest/<stage>."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, corpus_file, run_recipe

from pipeline.errors import UsageError
from pipeline.run import folder
from pipeline.studies import summary

SCRIPT = ROOT / "launch" / "quickstart.sh"


def quickstart(out: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """`bash launch/quickstart.sh OUT` with this interpreter's bin/ first on PATH (the script calls `python`)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    full = os.environ | {"PATH": path, "OMP_NUM_THREADS": "1"} | env
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=timeout, env=full, cwd=ROOT
    )


@pytest.fixture(scope="module")
def finished(tiny_teacher, char_data, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A quickstart folder whose three stages are finished (tiny models), under a runs root of its own."""
    root = tmp_path_factory.mktemp("quickstart")
    env = {"GPT_DISTILL_RUNS": str(root / "runs"), "GPT_DISTILL_DATA": str(root / "data")}
    out = root / "runs" / "quickstart"
    out.mkdir(parents=True)
    (out / "teacher").symlink_to(tiny_teacher.parent)  # the session's tiny teacher run
    common = ("--data", str(char_data), "--train.no-progress")
    run_recipe("distill", "--preset", "tiny", "--teacher", str(tiny_teacher), "--max-steps", "10",
               "--out", str(out / "student"), *common, env=env)  # fmt: skip
    run_recipe("evaluate", "--models", str(out / "teacher" / "best"), str(out / "student" / "best"),
               "--names", "teacher", "student", "--preset", "quick", "--prompts", "8", "--data", str(char_data),
               "--no-progress", "--out", str(out / "evaluate"), env=env)  # fmt: skip
    return out, env


def test_rerun_skips_finished_stages_and_ends_with_the_summary(finished):
    if corpus_file() is None:
        pytest.skip("the quickstart tokenizes Tiny Shakespeare: no local copy (../shared/data) here")
    out, env = finished
    proc = quickstart(out, env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n, stage in ((2, "pretrain"), (3, "distill"), (4, "evaluate")):
        assert f"[{n}/5] {stage}: done already" in proc.stdout
    record = json.loads((out / "summary.json").read_text())
    teacher = json.loads((out / "teacher" / "result.json").read_text())
    student = json.loads((out / "student" / "result.json").read_text())
    assert record["teacher"]["val_loss"] == teacher["best_val_loss"]
    assert record["student"]["val_loss"] == student["best_val_loss"]
    assert record["student"]["export"] == str(out / "student" / "best")
    assert 0 <= record["student"]["val_agree_top1"] <= 1
    assert record["teacher"]["evaluate"]["first_divergence_mean"] >= 1
    assert {name for name, s in record["stages"].items() if s["skipped"]} == {
        "pretrain",
        "distill",
        "evaluate",
    }
    printed = proc.stdout.split("summary (")[1]
    assert f"val loss {teacher['best_val_loss']:.4f}" in printed
    assert f"report: {out / 'evaluate' / 'report.md'}" in printed
    assert f"TensorBoard: tensorboard --logdir {out}" in printed
    assert "compounding errors:" in printed and "exposure-bias gap after" in printed


def test_finished_runs_under_the_runs_root_become_latest(finished):
    out, env = finished
    latest = Path(env["GPT_DISTILL_RUNS"]) / folder.LATEST
    assert (latest / "distill").resolve() == (out / "student").resolve()
    assert (latest / "evaluate").resolve() == (out / "evaluate").resolve()
    assert not (latest / "pretrain").exists()  # the teacher was trained outside this runs root


def test_distill_logs_ce_as_loss_train_beside_kd_and_their_mix(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished
    events = EventAccumulator(str(out / "student" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"Loss/train", "Loss/kd", "Loss/total", "Loss/val", "Val/agree_top1"} <= scalars
    assert not any(t.startswith(("train/loss", "train/ce", "train/soft")) for t in scalars)
    records = [
        r for r in map(json.loads, (out / "student" / "metrics.jsonl").read_text().splitlines()) if "ce" in r
    ]
    ce = {e.step: e.value for e in events.Scalars("Loss/train")}
    assert records and all(
        ce[r["step"]] == pytest.approx(r["ce"]) for r in records
    )  # metrics.jsonl keeps `ce`


def test_point_latest_moves_to_the_newest_run_and_never_replaces_a_real_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(folder.RUNS_ROOT_ENV, str(tmp_path))
    first, second = tmp_path / "pretrain" / "a-1", tmp_path / "pretrain" / "a-2"
    first.mkdir(parents=True)
    second.mkdir()
    assert folder.point_latest("pretrain", first) == tmp_path / "latest" / "pretrain"
    folder.point_latest("pretrain", second)
    link = tmp_path / "latest" / "pretrain"
    assert link.is_symlink() and link.resolve() == second.resolve()
    assert not os.path.isabs(os.readlink(link))  # relative: the runs folder can move
    assert folder.point_latest("pretrain", Path("/elsewhere/run")) is None
    (tmp_path / "latest" / "distill").mkdir()
    assert folder.point_latest("distill", second) is None
    assert (tmp_path / "latest" / "distill").is_dir() and not (tmp_path / "latest" / "distill").is_symlink()


def test_the_summary_refuses_an_evaluation_of_other_models(finished, tmp_path):
    out, _ = finished
    other = tmp_path / "other-student"
    shutil.copytree(out / "student", other)  # the same run elsewhere: its export was not evaluated
    with pytest.raises(UsageError, match="did not evaluate"):
        summary.summarise(out / "teacher", other, out / "evaluate")
    with pytest.raises(UsageError, match="does not exist"):
        summary.summarise(out / "teacher", out / "student", tmp_path)


def test_a_missing_install_is_one_clear_error(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}  # a python without the project (or none at all)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "q")], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 2 and "pip install -e ." in proc.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_the_quickstart_from_scratch_gives_a_teacher_and_a_student_that_learned(tmp_path):
    if corpus_file() is None:
        pytest.skip("the quickstart tokenizes Tiny Shakespeare: no local copy (../shared/data) here")
    env = {"GPT_DISTILL_RUNS": str(tmp_path / "runs"), "GPT_DISTILL_DATA": str(tmp_path / "data")}
    out = tmp_path / "runs" / "quickstart"
    proc = quickstart(out, env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "summary.json").read_text())
    ln_vocab = json.loads((out / "teacher" / "result.json").read_text())["ln_vocab"]
    assert record["teacher"]["val_loss"] < 0.6 * ln_vocab  # 65 characters: ln 65 = 4.17
    assert record["student"]["val_loss"] < 0.6 * ln_vocab and record["student"]["val_agree_top1"] > 0.6
    again = quickstart(out, env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 3


def test_a_skipped_stage_without_its_seconds_is_refused(finished):
    """--skipped NAME needs a --seconds NAME=...: the summary's stage list came from --seconds alone,
    so the skipped stage vanished from it without a word."""
    out, env = finished
    folders = (
        "--teacher",
        str(out / "teacher"),
        "--student",
        str(out / "student"),
        "--evaluate",
        str(out / "evaluate"),
    )
    before = (out / "summary.json").read_text() if (out / "summary.json").is_file() else None
    proc = run_recipe("summary", *folders, "--seconds", "pretrain=3", "--skipped", "tokenize", "--out",
                      str(out / "other.json"), env=env, check=False)  # fmt: skip
    assert proc.returncode == 2 and "--skipped tokenize: no --seconds NAME=SECONDS for it" in proc.stderr
    assert not (out / "other.json").exists()
    assert before is None or (out / "summary.json").read_text() == before
