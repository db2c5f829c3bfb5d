"""No silent wrong result from a damaged artifact: resumable states carry a manifest of every file's
sha256, exports a hash of the config their weights were saved with, a recorded tokenizer file its
sha256; damage is refused (or, for --train.resume auto, skipped with a warning), never used.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import need_tiktoken, run_recipe
from safetensors.torch import load_file, save_file

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import UsageError
from pipeline.run import checkpoint
from pipeline.train import stage

# The `tiny_teacher` fixture's own arguments: a resume must repeat them.
TEACHER_ARGS = ("--preset", "tiny", "--max-steps", "20", "--train.precision", "no", "--train.no-progress")
STEP_10, STEP_20 = "states/step_0000010", "states/step_0000020"


@pytest.fixture
def teacher_run(tiny_teacher, tmp_path) -> Path:
    """A copy of the tiny teacher's run folder (states at steps 10 and 20, best/ and last/)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher.parent, run)
    return run


@pytest.fixture
def export(tiny_teacher, tmp_path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(tiny_teacher, out)
    return out


def flip_byte(file: Path, offset: int = -1) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def test_damaged_newest_state_is_skipped_and_the_run_resumes_exactly_from_the_previous_one(
    teacher_run, tiny_teacher, char_data
):
    newest = teacher_run / STEP_20
    assert (newest / checkpoint.MANIFEST).is_file() and (newest / "optimizer.bin").is_file()
    flip_byte(newest / "optimizer.bin")
    # An explicit resume of it is refused, naming the file and the intact state to take instead.
    with pytest.raises(UsageError, match=r"optimizer\.bin") as err:
        stage._choose_run("pretrain", "tiny", str(teacher_run), str(newest))
    assert f"--train.resume {teacher_run / STEP_10}" in str(err.value)
    # Litter of an interrupted export and state write, cleared at the next start.
    (teacher_run / ".best.tmp-123").mkdir()
    (teacher_run / "states" / ".step_0000030.tmp").mkdir()

    proc = run_recipe(
        "pretrain",
        *TEACHER_ARGS,
        "--data",
        str(char_data),
        "--out",
        str(teacher_run),
        "--train.resume",
        "auto",
    )
    assert f"skipping the damaged state {newest}" in proc.stdout and "optimizer.bin" in proc.stdout
    assert f"resumed from {teacher_run / STEP_10} at step 10" in proc.stdout
    assert not (teacher_run / ".best.tmp-123").exists()
    assert not (teacher_run / "states" / ".step_0000030.tmp").exists()
    # Steps 11-20 again from the intact state: the same weights and metrics as the uninterrupted run.
    straight = load_file(str(tiny_teacher.parent / "last" / checkpoint.WEIGHTS))
    resumed = load_file(str(teacher_run / "last" / checkpoint.WEIGHTS))
    assert set(straight) == set(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = json.loads((tiny_teacher.parent / "result.json").read_text())
    b = json.loads((teacher_run / "result.json").read_text())
    assert (a["final_val_loss"], a["best_val_loss"]) == (b["final_val_loss"], b["best_val_loss"])
    assert checkpoint.check_state(newest).damage is None  # rewritten intact at step 20


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ("flip model.safetensors", "model.safetensors"),
        ("flip random_states_0.pkl", "random_states_0.pkl"),
        ("truncate optimizer.bin", "optimizer.bin"),
        ("delete random_states_0.pkl", "random_states_0.pkl is missing"),
        ("break trainer_state.json", "trainer_state.json"),
        ("add random_states_1.pkl", "random_states_1.pkl is not in"),
        ("break manifest.json", "manifest.json is unreadable"),
    ],
)
def test_every_kind_of_state_damage_is_found_and_named(teacher_run, fault, named):
    action, name = fault.split()
    file = teacher_run / STEP_20 / name
    if action == "flip":
        flip_byte(file, offset=len(file.read_bytes()) // 2)
    elif action == "truncate":
        file.write_bytes(file.read_bytes()[:-10])
    elif action == "delete":
        file.unlink()
    elif action == "add":
        shutil.copy(file.with_name("random_states_0.pkl"), file)
    else:
        file.write_text(file.read_text()[:-5])
    assert named in checkpoint.check_state(file.parent).damage
    warnings: list[str] = []
    assert checkpoint.latest_state(teacher_run, warn=warnings.append) == teacher_run / STEP_10
    assert len(warnings) == 1 and named in warnings[0]
    with pytest.raises(UsageError, match="cannot resume from"):
        checkpoint.require_intact_state(file.parent, warn=warnings.append)


def test_a_state_saved_before_manifests_resumes_with_a_warning(teacher_run):
    (teacher_run / STEP_20 / checkpoint.MANIFEST).unlink()
    warnings: list[str] = []
    assert checkpoint.latest_state(teacher_run, warn=warnings.append) == teacher_run / STEP_20
    checkpoint.require_intact_state(teacher_run / STEP_20, warn=warnings.append)
    assert len(warnings) == 2 and all("unverified" in w for w in warnings)
    # ...but a broken trainer_state.json is still found, and refused when loaded.
    (teacher_run / STEP_20 / checkpoint.TRAINER_STATE).write_text("{")
    assert "not valid JSON" in checkpoint.check_state(teacher_run / STEP_20).damage
    with pytest.raises(UsageError, match=r"trainer_state\.json .*--train\.resume auto"):
        checkpoint.load_state(None, teacher_run / STEP_20, {})


def test_no_intact_state_left_refuses_an_explicit_resume_with_the_way_out(teacher_run):
    for step in (STEP_10, STEP_20):
        flip_byte(teacher_run / step / checkpoint.TRAINER_STATE)
    assert checkpoint.latest_state(teacher_run, warn=lambda _: None) is None
    with pytest.raises(UsageError, match=r"no other state .* is intact: start a new run with another --out"):
        checkpoint.require_intact_state(teacher_run / STEP_20)


def test_open_run_clears_interrupted_writes_and_puts_back_a_displaced_export(teacher_run):
    (teacher_run / ".best.tmp-123").mkdir()
    (teacher_run / "states" / ".step_0000030.tmp").mkdir()
    (teacher_run / "states" / ".step_0000010.old-77").mkdir()  # step_0000010 exists: stale
    shutil.move(teacher_run / "last", teacher_run / ".last.old-99")  # crash between the two renames
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    stage.open_run(accelerator, "pretrain", "tiny", str(teacher_run), "auto")
    assert sorted(p.name for p in teacher_run.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (teacher_run / "states").iterdir()) == ["step_0000010", "step_0000020"]
    assert checkpoint.load_export(teacher_run / "last").info.step == 20


def test_config_json_that_no_longer_describes_its_weights_is_refused(export):
    checkpoint.load_export(export)  # intact: loads
    edit_json(export / checkpoint.CONFIG, lambda c: c["model"].update(n_heads=4))  # same shapes
    with pytest.raises(
        UsageError, match=r"not the config its weights were saved with \(model\.n_heads: saved 2"
    ):
        checkpoint.load_export(export)


def test_export_without_the_config_hash_loads_unchecked(export):
    weights = load_file(str(export / checkpoint.WEIGHTS))
    save_file(weights, str(export / checkpoint.WEIGHTS), metadata={"format": "pt"})  # an older export
    edit_json(export / checkpoint.CONFIG, lambda c: c["model"].update(n_heads=4))
    assert checkpoint.load_export(export).model_cfg.n_heads == 4


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("truncate weights", "model.safetensors is not a readable safetensors file"),
        ("replace weights", "model.safetensors is not a readable safetensors file"),
        ("break config", "config.json is unreadable or not valid JSON"),
        ("drop model", "config.json lacks model"),
    ],
)
def test_broken_export_files_are_usage_errors_naming_the_file(export, damage, named):
    weights, config = export / checkpoint.WEIGHTS, export / checkpoint.CONFIG
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "replace weights":
        weights.write_bytes(b"PK\x03\x04 not safetensors at all")
    elif damage == "break config":
        config.write_text(config.read_text()[:-3])
    else:
        edit_json(config, lambda c: c.pop("model"))
    with pytest.raises(UsageError, match=named) as err:
        checkpoint.load_export(export)
    assert "re-export" in str(err.value)


def test_generate_on_a_truncated_export_exits_2_naming_the_file(export):
    weights = export / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])
    proc = run_recipe("generate", "--model", str(export), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and str(weights) in proc.stderr


def test_a_tokenizer_file_changed_or_gone_after_export_is_refused(export, tmp_path):
    need_tiktoken("cl100k_base")
    ranks = tmp_path / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    tokenizer = Tokenizer.build(str(ranks))
    loaded = checkpoint.load_export(export)
    weights = load_file(str(export / checkpoint.WEIGHTS))
    info = checkpoint.ExportInfo.from_json(checkpoint.read_export_config(export)).to_json()
    checkpoint.export_model(export, weights, loaded.model_cfg, tokenizer.spec, loaded.vocab, info)
    assert checkpoint.load_export(export).tokenizer.decode([104, 105]) == "hi"
    ranks.write_text(ranks.read_text().replace(" 255\n", " 256\n"))  # another file at the same path
    with pytest.raises(UsageError, match=rf"export {export}: the tokenizer file {ranks} changed"):
        checkpoint.load_export(export)
    ranks.unlink()
    with pytest.raises(UsageError, match=r"bytes\.tiktoken recorded in the tokenizer spec is missing"):
        checkpoint.load_export(export)
