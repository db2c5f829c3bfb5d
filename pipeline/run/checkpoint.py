"""The one checkpoint module. Two artifacts:

* an **export**: `model.safetensors` + `config.json` (model shape, tokenizer, vocabulary map, how it
  was trained). Later stages load only exports, strictly.
* a **resumable state**: `accelerator.save_state` (model, optimizer, RNG of every process) plus
  `trainer_state.json` (step, tokens, early-stopping bookkeeping, and the shape it belongs to).

Both are written into a temporary folder and renamed into place, so a crash never leaves a
half-written artifact under the real name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.files import write_json
from pipeline.model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
STATES = "states"
EXPORT_FORMAT = 1


@dataclass
class Export:
    """A loaded export: the model (on the CPU, eval mode) and what describes it."""

    path: Path
    model: GPT
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    vocab: VocabMap
    info: dict[str, Any]


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def export_model(
    dest: Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    tokenizer_spec: dict[str, Any],
    vocab: VocabMap,
    info: dict[str, Any],
) -> None:
    """Write an export of `model` (an unwrapped GPT) to `dest` atomically. Main process only."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    config = {
        "format": EXPORT_FORMAT,
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer_spec,
        "vocab": vocab.to_json(),
        **info,
    }
    write_json(tmp / CONFIG, config)
    _swap_into_place(tmp, dest)


def resolve_export(path: str | Path) -> Path:
    """An export folder, or a run folder (its best/ export is taken)."""
    path = Path(path)
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        return path
    if (path / "best" / WEIGHTS).is_file():
        return path / "best"
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass an exported model folder (a run's best/ or last/)")
    raise UsageError(
        f"{path} is not an exported model (no {WEIGHTS} and {CONFIG}); pass a run's best/ or last/ folder"
    )


def read_export_config(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve_export(path) / CONFIG).read_text())


def load_export(path: str | Path) -> Export:
    """Load an export strictly: every weight present, no extra ones, shapes as configured."""
    path = resolve_export(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise UsageError(
            f"{path} has export format {config.get('format')}, this version reads {EXPORT_FORMAT}"
        )
    model_cfg = ModelConfig(**config["model"])
    model = GPT(model_cfg)
    state = load_file(str(path / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"{path}: weights do not match config.json ({err})") from err
    model.eval()
    info = {k: v for k, v in config.items() if k not in ("model", "tokenizer", "vocab")}
    return Export(
        path,
        model,
        model_cfg,
        Tokenizer.from_spec(config["tokenizer"]),
        VocabMap.from_json(config["vocab"]),
        info,
    )


# --------------------------------------------------------------------------------------------------
# Resumable state
# --------------------------------------------------------------------------------------------------


def state_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / STATES
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


def latest_state(run_dir: Path) -> Path | None:
    states = state_dirs(run_dir)
    return states[-1] if states else None


def save_state(accelerator: Any, run_dir: Path, trainer_state: dict[str, Any], keep: int) -> Path:
    """accelerator.save_state + trainer_state.json into states/step_N, then prune; all ranks call it."""
    step = int(trainer_state["step"])
    dest = run_dir / STATES / f"step_{step:07d}"
    tmp = run_dir / STATES / f".step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / TRAINER_STATE, trainer_state)
        _swap_into_place(tmp, dest)
        for old in state_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return dest


def load_state(accelerator: Any, state_dir: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Restore a resumable state after checking it belongs to the same model and batch layout."""
    trainer_state = json.loads((state_dir / TRAINER_STATE).read_text())
    diffs = [
        f"{key}: saved {trainer_state.get(key)!r}, now {value!r}"
        for key, value in expect.items()
        if trainer_state.get(key) != value
    ]
    if diffs:
        raise UsageError(
            f"cannot resume from {state_dir}: it was saved by a different run setup ({'; '.join(diffs)}); "
            f"resume with the same settings or start a new run with another --out"
        )
    accelerator.load_state(str(state_dir))
    return trainer_state
