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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.data.shards import TokenData
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
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper module


@dataclass(frozen=True)
class DataInfo:
    """The data an export was trained on, as its config.json records it under "data"."""

    dir: str
    encoding: str
    vocab_size: int
    train_tokens: int
    bytes_per_token: float
    source_sha256: str | None = None

    @classmethod
    def of(cls, data: TokenData) -> DataInfo:
        meta = data.meta
        return cls(
            dir=str(data.dir),
            encoding=meta["encoding"],
            vocab_size=int(meta["vocab_size"]),
            train_tokens=int(meta["train_tokens"]),
            bytes_per_token=data.bytes_per_token,
            source_sha256=meta["source"]["sha256"],
        )


@dataclass(frozen=True)
class ExportInfo:
    """How an export was made: what its config.json records beside the model, tokenizer and vocabulary.

    Teachers and students share the fields; `teacher`, `init` and `kd` are a student's only.
    """

    kind: str  # "teacher" or "student"
    preset: str | None
    run: str
    data: DataInfo | None = None
    step: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    teacher: str | None = None
    init: str | None = None
    kd: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The config.json keys, in the order exports have always written them (unset student keys left out)."""
        out: dict[str, Any] = {"kind": self.kind, "preset": self.preset, "run": self.run}
        out |= {k: getattr(self, k) for k in ("teacher", "init", "kd") if getattr(self, k) is not None}
        out["data"] = None if self.data is None else dataclasses.asdict(self.data)
        best = self.best_val_loss
        return out | {"step": self.step, "tokens": self.tokens, "best_val_loss": best}

    @classmethod
    def from_json(cls, config: dict[str, Any]) -> ExportInfo:
        data = config.get("data")
        return cls(
            kind=config.get("kind", "–"),
            preset=config.get("preset"),
            run=config.get("run", ""),
            data=None if data is None else DataInfo(**data),
            step=int(config.get("step", 0)),
            tokens=int(config.get("tokens", 0)),
            best_val_loss=config.get("best_val_loss"),
            teacher=config.get("teacher"),
            init=config.get("init"),
            kd=config.get("kd"),
        )

    def at(self, step: int, tokens: int, best_val_loss: float) -> ExportInfo:
        """The same record for an export written at `step`."""
        return dataclasses.replace(self, step=step, tokens=tokens, best_val_loss=best_val_loss)


@dataclass
class Export:
    """A loaded export: the model (on the CPU, eval mode) and what describes it."""

    path: Path
    model: GPT
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    vocab: VocabMap
    info: ExportInfo


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def gathered_state_dict(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights from a prepared `model`, for `export_model`. EVERY rank must call it.

    Under FSDP a wrapped model's own state_dict() holds this rank's shards (DTensors), and
    gathering them is a collective: called on one rank alone it would hang. Accelerate gathers
    them to the main process's CPU (other ranks may get an empty dict); under DDP or on one
    process this is the plain state dict. A torch.compile wrapper's key prefix is dropped.
    """
    state = accelerator.get_state_dict(model)
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}


def export_model(
    dest: Path,
    state_dict: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    tokenizer_spec: dict[str, Any],
    vocab: VocabMap,
    info: dict[str, Any],
) -> None:
    """Write an export of a GPT's full `state_dict` (see `gathered_state_dict`) to `dest` atomically.

    Main process only. Refuses shards (and an empty dict), so exporting the un-gathered state of a
    sharded model fails here rather than writing a file that only looks like a model.
    """
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    _check_gathered(state, dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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


def _check_gathered(state: dict[str, torch.Tensor], dest: Path) -> None:
    # A DTensor (FSDP2) or ShardedTensor (FSDP1) reports the full shape while holding one rank's
    # shard, so the tensor type tells a gathered state dict from a sharded one. Keys and shapes are
    # checked by load_export (checking them here would mean building the model, seconds for 200k rows).
    shards = sorted(k for k, v in state.items() if type(v) is not torch.Tensor)
    if shards or not state:
        found = f"shards ({type(state[shards[0]]).__name__}) in {shards[:3]}" if shards else "no weights"
        raise UsageError(
            f"cannot export {dest}: {found}, not the whole model; gather it on every rank with "
            f"checkpoint.gathered_state_dict(accelerator, model) and export on the main process"
        )


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
    info = ExportInfo.from_json(config)
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
