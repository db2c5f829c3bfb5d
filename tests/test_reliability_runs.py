"""Run folders are never written through a symbolic link, hold each step once, and say what they hold.

Unit tests on RunDir and the atomic writes, then the pretrain recipe for a few tiny steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import read_jsonl, run_recipe

from pipeline.errors import UsageError
from pipeline.files import write_json
from pipeline.run.folder import RunDir, holds_run

OUTSIDE = "do not touch\n"


def pretrain(data, out, *args, **kw):
    return run_recipe(
        "pretrain",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--out",
        str(out),
        "--train.precision",
        "no",
        "--train.no-progress",
        "--train.projector-tokens",
        "0",
        "--train.sample-tokens",
        "0",
        *args,
        **kw,
    )


@pytest.fixture
def outside(tmp_path) -> Path:
    target = tmp_path / "outside.txt"
    target.write_text(OUTSIDE)
    return target


def test_a_linked_run_folder_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError, match=r"link.*symbolic link.*--out"):
        RunDir(tmp_path / "link")


@pytest.mark.parametrize("name", ["metrics.jsonl", "result.json", "config.json", "best", "states", "tb"])
def test_a_planted_link_in_the_run_folder_is_refused(tmp_path, outside, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside)
    with pytest.raises(UsageError, match=f"{run / name} is a symbolic link") as err:
        RunDir(run)
    assert f"rm {run / name}" in str(err.value)
    assert outside.read_text() == OUTSIDE


def test_a_link_deep_in_a_subfolder_is_refused(tmp_path, outside):
    step = tmp_path / "run" / "states" / "step_0000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").symlink_to(outside)
    with pytest.raises(UsageError, match=r"model\.safetensors is a symbolic link"):
        RunDir(tmp_path / "run")


def test_links_planted_after_opening_are_not_followed(tmp_path, outside):
    run = RunDir(tmp_path / "run")
    (run.path / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(UsageError, match=r"metrics\.jsonl is a symbolic link"):
        run.log_metrics({"step": 1, "loss": 1.0})
    # The rename replaces a link at the destination itself; a planted temporary file is not followed.
    (run.path / "result.json").symlink_to(outside)
    (run.path / f".env.json.tmp-{os.getpid()}").symlink_to(outside)
    run.write_result({"step": 1})
    run.write_env({"host": "here"})
    assert outside.read_text() == OUTSIDE
    assert not (run.path / "result.json").is_symlink()
    assert json.loads((run.path / "result.json").read_text()) == {"step": 1}
    assert json.loads((run.path / "env.json").read_text()) == {"host": "here"}
    assert sorted(p.name for p in run.path.iterdir()) == ["env.json", "metrics.jsonl", "result.json"]


def test_write_json_replaces_a_stale_temporary_file(tmp_path):
    (tmp_path / f".a.json.tmp-{os.getpid()}").write_text("stale")
    write_json(tmp_path / "a.json", [1])
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and json.loads(
        (tmp_path / "a.json").read_text()
    ) == [1]


def test_truncate_metrics_keeps_each_step_once_across_resumes(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in range(1, 9):  # an interrupted session: state saved at 4, logged up to 8
        run.log_metrics({"step": step, "loss": 1.0})
    run.truncate_metrics(4)
    assert [r["step"] for r in read_jsonl(run.path / "metrics.jsonl")] == [1, 2, 3, 4]
    for step in range(5, 7):  # resumed from 4, interrupted again; state at 6
        run.log_metrics({"step": step, "loss": 2.0})
    run.truncate_metrics(6)
    run.truncate_metrics(6)  # idempotent
    for step in range(7, 11):
        run.log_metrics({"step": step, "loss": 3.0})
    records = read_jsonl(run.path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["loss"] for r in records] == [1.0] * 4 + [2.0] * 2 + [3.0] * 4
    RunDir(tmp_path / "fresh").truncate_metrics(3)  # no metrics yet: nothing to do
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_holds_run_needs_a_state_an_export_or_a_metrics_record(tmp_path, outside):
    run = RunDir(tmp_path / "run")
    run.write_config({})
    run.write_env({})
    assert not holds_run(run.path) and not RunDir.holds_run(run.path)  # failed before step 1
    (run.path / "states" / ".step_0000002.tmp").mkdir(parents=True)  # an unfinished state
    (run.path / "metrics.jsonl").write_text("\n")
    assert not holds_run(run.path)
    (run.path / "metrics.jsonl").unlink()
    (run.path / "metrics.jsonl").symlink_to(outside)
    assert not holds_run(run.path)
    (run.path / "metrics.jsonl").unlink()
    run.log_metrics({"step": 1})
    assert holds_run(run.path)
    (run.path / "metrics.jsonl").unlink()
    (run.path / "last").mkdir()
    (run.path / "last" / "model.safetensors").write_bytes(b"")
    assert holds_run(run.path)
    (run.path / "last" / "model.safetensors").unlink()
    (run.path / "states" / "step_0000002").mkdir()
    (run.path / "states" / "step_0000002" / "trainer_state.json").write_text("{}")
    assert holds_run(run.path)


def test_linked_out_and_planted_metrics_link_are_refused_before_any_work(char_data, tmp_path, outside):
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    proc = pretrain(char_data, tmp_path / "linked", "--max-steps", "2", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"run folder {tmp_path / 'linked'} is a symbolic link" in proc.stderr
    assert list((tmp_path / "real").iterdir()) == []

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(outside)
    proc = pretrain(char_data, run, "--max-steps", "2", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{run / 'metrics.jsonl'} is a symbolic link" in proc.stderr
    assert outside.read_text() == OUTSIDE
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]  # nothing written, not even config.json


def test_stop_at_names_only_the_exports_it_wrote_and_how_to_continue(char_data, tmp_path):
    run = tmp_path / "run"
    args = ("--max-steps", "4", "--train.eval-interval", "2", "--train.log-interval", "1")
    proc = pretrain(char_data, run, *args, "--train.stop-at", "2")
    assert not (run / "last").exists() and (run / "best").is_dir()
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and str(run / "best") in done[0] and "last" not in done[0]
    assert (
        f"stopped at step 2 of 4 (--train.stop-at) with a resumable state in {run / 'states' / 'step_0000002'};"
        in proc.stdout
    )
    assert f"--train.resume auto --out {run}" in proc.stdout
    assert "last" not in proc.stdout.replace("--train.stop-at", "")
