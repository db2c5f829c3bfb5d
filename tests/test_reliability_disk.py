"""File-system failures: a full disk, a read-only folder, a permission error (README: Reliability).

Each ends as `error: <what> could not be written to <file> (<strerror>): <fix>` with exit status 2,
the temporary file or folder of the failed write removed and the earlier artifacts intact. The
full disk and the read-only folder are real (a small tmpfs, mounted as root; skipped with the
reason where mounting is not allowed); the permission error is injected in-process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_recipe, synthetic_text

from pipeline import cli, files
from pipeline.config import ModelConfig, TokenizeConfig
from pipeline.data import tokenize
from pipeline.data.shards import TokenData
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError, WriteError
from pipeline.model.gpt import GPT
from pipeline.run import checkpoint
from pipeline.run.folder import RunDir, read_metrics

FULL_FIX = "free space on the disk holding"
READ_ONLY_FIX = "is read-only or not yours: pass a writable --out"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`; skips the test (with the reason) where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
    except OSError as err:  # no mount command
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def write_export(dest: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=16, vocab_size=8)
    weights = GPT(cfg).state_dict()
    tokenizer = Tokenizer.char(list("abcdefgh"))
    checkpoint.export_model(dest, weights, cfg, tokenizer.spec, VocabMap.identity(8), {"kind": "teacher"})
    return weights


def assert_export_is(dest: Path, weights: dict[str, torch.Tensor]) -> None:
    loaded = checkpoint.load_export(dest).model.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


def test_a_full_disk_mid_run_exits_2_naming_the_file_and_keeps_the_earlier_export_and_states(
    char_data, tmp_path
):
    # Sized so that the states of steps 5 and 10 and a best/ export fit and a later write does not:
    # here the state of step 15 (between 2.2 and 2.6 MB another export or TensorBoard's events
    # fail instead, each with its own `error:`; the whole run writes about 3.5 MB with keep 10).
    with tmpfs(tmp_path / "disk", "2400k") as disk:
        out = disk / "run"
        proc = run_recipe(
            "pretrain", "--preset", "tiny", "--data", str(char_data), "--out", str(out),
            "--max-steps", "20", "--train.eval-interval", "5", "--train.keep-states", "10",
            "--train.precision", "no", "--train.no-progress", check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        last = errors[0]
        assert re.fullmatch(
            rf"error: .+ could not be written to (a file under )?{re.escape(str(out))}\S* "
            rf"\(No space left on device\): {FULL_FIX} {re.escape(str(out))}\S* or pass another --out",
            last,
        ), last
        states = checkpoint.state_dirs(out)
        assert states, "the disk filled before the first state: the tmpfs is too small for this test"
        for state in states:
            assert checkpoint.check_state(state).damage is None
        assert checkpoint.load_export(out / "best").info.step >= 5
        assert read_metrics(out)  # every line still parses
        assert litter(out) == []


def test_a_read_only_folder_refuses_every_write_and_leaves_what_was_there(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        run = RunDir(disk / "run")
        run.write_config({"a": 1})
        run.log_metrics({"step": 1, "loss": 2.0})
        weights = write_export(disk / "run" / "best")
        remount_read_only(disk)

        with pytest.raises(SystemExit) as exit_:
            cli.run(lambda cfg: RunDir(cfg.out), SimpleNamespace(out=disk / "other"))
        assert exit_.value.code == cli.EXIT_USAGE
        assert capsys.readouterr().err == (
            f"error: the run folder could not be written to {disk / 'other'} (Read-only file system): "
            f"the folder {disk} {READ_ONLY_FIX}\n"
        )
        with pytest.raises(WriteError, match=rf"the export best/ could not be written to .*{READ_ONLY_FIX}"):
            write_export(disk / "run" / "best", seed=1)
        with pytest.raises(WriteError, match=r"the run config could not be written to .*config\.json"):
            run.write_config({"a": 2})
        with pytest.raises(WriteError, match=r"a metrics record could not be written to .*metrics\.jsonl"):
            run.log_metrics({"step": 2, "loss": 1.0})
        assert_export_is(disk / "run" / "best", weights)
        assert json.loads((disk / "run" / "config.json").read_text()) == {"a": 1}
        assert read_metrics(disk / "run") == [{"step": 1, "loss": 2.0}]


def test_a_write_that_does_not_fit_leaves_no_half_line_and_names_the_file(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        run = RunDir(disk / "run")
        run.log_metrics({"step": 1})
        with open(disk / "ballast", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:  # fill the disk to its last byte
                fh.write(b"\0" * 4096)
        with pytest.raises(WriteError, match=rf"\(No space left on device\): {FULL_FIX} {disk / 'run'} "):
            run.log_metrics({"step": 2, "text": "x" * 20_000})  # more than the page metrics.jsonl has left
        assert read_metrics(disk / "run") == [{"step": 1}]
        # torch.save's C++ writer reports a full disk as a RuntimeError without an errno.
        target = disk / "run" / "optimizer.bin"

        def save() -> None:
            with files.writing(target, "the state", cleanup=lambda: target.unlink(missing_ok=True)):
                torch.save(torch.zeros(100_000), target)

        with pytest.raises(WriteError, match=rf"the state could not be written to {target} \(No space left"):
            save()
        assert not target.exists()


def eacces(path: os.PathLike[str] | str) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def test_a_permission_error_on_a_json_write_exits_2_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    file = tmp_path / "result.json"
    files.write_json(file, {"old": True})
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise eacces(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", refuse)
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda _: files.write_json(file, {"old": False}, "the run result"), None)
    assert exit_.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        f"error: the run result could not be written to {file} (Permission denied): "
        f"the folder {tmp_path} {READ_ONLY_FIX}\n"
    )
    assert json.loads(file.read_text()) == {"old": True}
    assert litter(tmp_path) == []


def test_a_permission_error_mid_export_keeps_the_previous_export(tmp_path, monkeypatch):
    dest = tmp_path / "best"
    weights = write_export(dest)
    monkeypatch.setattr(
        checkpoint, "save_file", lambda _state, name, metadata: (_ for _ in ()).throw(eacces(name))
    )
    with pytest.raises(
        UsageError, match=rf"the export best/ could not be written to {dest} \(Permission denied\)"
    ):
        write_export(dest, seed=1)
    assert_export_is(dest, weights)
    assert litter(tmp_path) == []


class FailingAccelerator:
    """Accelerate's save_state surface on one process; fails (as a library would) once `fail` is set."""

    is_main_process = True

    def __init__(self) -> None:
        self.fail: BaseException | None = None

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.fail is not None:
            raise self.fail


@pytest.mark.parametrize(
    "failure, reason",
    [
        (eacces("x"), "Permission denied"),
        # How safetensors and torch.save's C++ writer report a full disk: no OSError at all.
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), None),
    ],
)
def test_a_failed_state_write_keeps_every_earlier_state_and_prunes_nothing(tmp_path, failure, reason):
    accelerator = FailingAccelerator()
    first = checkpoint.save_state(accelerator, tmp_path, {"step": 5}, keep=1)
    accelerator.fail = failure
    reason = reason or "No space left on device"
    with pytest.raises(
        WriteError, match=rf"the resumable state could not be written to .*step_0000010 \({reason}\)"
    ):
        checkpoint.save_state(accelerator, tmp_path, {"step": 10}, keep=1)
    assert checkpoint.state_dirs(tmp_path) == [first]
    assert checkpoint.check_state(first).damage is None
    assert litter(tmp_path) == []


def test_other_os_errors_are_not_taken_for_a_write_failure(tmp_path):
    def broken() -> None:
        with files.writing(tmp_path / "x", "x"):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        broken()


def test_a_tokenization_that_does_not_fit_keeps_the_previous_one(tmp_path):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(synthetic_text(20_000))
    large.write_text(synthetic_text(300_000))
    with tmpfs(
        tmp_path / "disk", "400k"
    ) as disk:  # shards of 2 bytes a character: the large one does not fit
        out = disk / "data"

        def run(corpus: Path) -> None:
            cfg = TokenizeConfig(input=str(corpus), encoding="char", out=str(out), overwrite=True)
            tokenize.tokenize(cfg, log=lambda _: None, progress=False)

        run(small)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(
            WriteError, match=rf"the tokenized data could not be written to {out}/\w+\.bin \(No space left"
        ):
            run(large)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert TokenData.open(out).meta["train_tokens"] > 0


def test_a_writer_threads_warning_and_the_error_are_each_one_whole_line_written_at_once(monkeypatch):
    """TensorBoard's writer thread can die of the full disk while the main thread reports it: each
    line must go out in one write, or the two interleave ("warning: ...error: ..." on one line, seen)."""
    import io
    import sys
    import threading

    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", Recorder())

    def writer() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with cli._thread_write_failures_in_one_line():
        thread = threading.Thread(target=writer, name="writer")
        thread.start()
        thread.join()
    with pytest.raises(SystemExit):
        cli.fail("output could not be written")
    assert writes == [
        "warning: thread writer: [Errno 28] No space left on device\n",
        "error: output could not be written\n",
    ]
