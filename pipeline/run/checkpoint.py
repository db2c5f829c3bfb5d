"""The one checkpoint module. Two artifacts:

* an **export**: `model.safetensors` + `config.json` (model shape, tokenizer, vocabulary map, how it
  was trained). Later stages load only exports, strictly.
* a **resumable state**: `accelerator.save_state` (model, optimizer, RNG of every process) plus
  `trainer_state.json` (step, tokens, early-stopping bookkeeping, and the shape it belongs to).

Both are written into a temporary folder and renamed into place, so a crash never leaves a
half-written artifact under the real name (`remove_litter` clears what an interrupted write leaves
beside it). Both carry what detects later damage: a state's `manifest.json` (written last) holds
every file's size and sha256, and an export's safetensors metadata holds its config's hash, so a
damaged state or a config.json that no longer describes its weights is refused, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.data.shards import TokenData
from pipeline.data.tokenizer import Tokenizer, file_sha256
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.files import remove_tree, write_json, writing
from pipeline.model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
STATES = "states"
EXPORT_FORMAT = 1
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper module
# What export_model, save_state and _swap_into_place leave when interrupted: .NAME.tmp-PID,
# .step_N.tmp, .NAME.old-PID.
_LITTER = re.compile(r"\.(?P<name>[^/]+?)\.(?P<kind>tmp|old)(-\d+)?")


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
    """Rename the finished folder `tmp` to `dest`; the previous `dest` goes only once `tmp` is in place.

    When the second rename fails (the first has moved the old artifact aside), the old one is put
    back before the error propagates, so `dest` is always the old artifact or the new one.
    """
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
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
    described = _as_json(
        {"model": dataclasses.asdict(model_cfg), "tokenizer": tokenizer_spec, "vocab": vocab.to_json()}
    )
    # A failed write (disk full, read-only folder) removes tmp and leaves the previous export as it was.
    with writing(dest, f"the export {dest.name}/", cleanup=remove_tree(tmp)):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", **_config_metadata(described)})
        write_json(tmp / CONFIG, {"format": EXPORT_FORMAT, **described, **info})
        _swap_into_place(tmp, dest)


def _as_json(data: Any) -> Any:
    """`data` as config.json will read back (write_json's encoding), so hashes at save and load agree."""
    return json.loads(json.dumps(data, default=str))


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _config_metadata(described: dict[str, Any]) -> dict[str, str]:
    """What the weights file records of the config it was saved with (safetensors metadata is str -> str)."""
    return {
        "config_sha256": _digest(described),
        "model_config": json.dumps(described["model"], sort_keys=True),
        "tokenizer_sha256": _digest(described["tokenizer"]),
        "vocab_sha256": _digest(described["vocab"]),
    }


def _config_mismatch(metadata: dict[str, str], config: dict[str, Any]) -> str | None:
    """What differs between config.json and the config its weights were saved with; None: the same.

    Exports written before the hash existed carry none and pass unchecked.
    """
    if "config_sha256" not in metadata:
        return None
    described = {key: config.get(key) for key in ("model", "tokenizer", "vocab")}
    if _digest(described) == metadata["config_sha256"]:
        return None
    saved = json.loads(metadata.get("model_config", "{}"))
    now = described["model"] or {}
    diffs = [
        f"model.{key}: saved {saved.get(key)!r}, config.json {now.get(key)!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
    diffs += [
        f"{key} differs from the one saved with the weights"
        for key in ("tokenizer", "vocab")
        if _digest(described[key]) != metadata.get(f"{key}_sha256")
    ]
    return "; ".join(diffs) or "its model/tokenizer/vocab differ from those saved with the weights"


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


def _reexport_hint(path: Path) -> str:
    return f"re-export it (copy the run's best/ or last/ folder again, or rerun the stage that wrote {path})"


def _read_json(file: Path, fix: str) -> dict[str, Any]:
    """A JSON object from `file`, or a UsageError naming the file and `fix`."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{file} is unreadable or not valid JSON ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{file} holds a {type(data).__name__}, not a JSON object; {fix}")
    return data


def read_export_config(path: str | Path) -> dict[str, Any]:
    path = resolve_export(path)
    return _read_json(path / CONFIG, _reexport_hint(path))


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an export's weights file, or a UsageError naming it."""
    file = path / WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
            return tensors, dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types (and OSError) for a damaged file
        raise UsageError(
            f"{file} is not a readable safetensors file, truncated or of another format "
            f"({type(err).__name__}: {err}); {_reexport_hint(path)}"
        ) from err


def model_config_from_json(saved: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a config.json's "model" describes, behaving as it did when saved.

    Fields added later take their defaults, except where the default changed behaviour: a
    sinusoidal model saved before `sinusoidal_scale` existed had the unit-amplitude table.
    """
    if saved.get("positions") == "sinusoidal" and "sinusoidal_scale" not in saved:
        saved = saved | {"sinusoidal_scale": "unit"}
    return ModelConfig(**saved)


def load_export(path: str | Path) -> Export:
    """Load an export strictly: every weight present, no extra ones, shapes as configured, and a
    config.json that is the one saved with the weights (same hash) and a tokenizer file unchanged."""
    path = resolve_export(path)
    config = read_export_config(path)
    if config.get("format") != EXPORT_FORMAT:
        raise UsageError(
            f"{path} has export format {config.get('format')}, this version reads {EXPORT_FORMAT}"
        )
    missing = [key for key in ("model", "tokenizer", "vocab") if not isinstance(config.get(key), dict)]
    if missing:
        raise UsageError(f"{path / CONFIG} lacks {', '.join(missing)}; {_reexport_hint(path)}")
    state, metadata = _read_weights(path)
    mismatch = _config_mismatch(metadata, config)
    if mismatch:
        raise UsageError(
            f"{path / CONFIG} is not the config its weights were saved with ({mismatch}); restore the "
            f"export's own config.json or {_reexport_hint(path)}"
        )
    try:
        model_cfg = model_config_from_json(config["model"])
    except TypeError as err:
        raise UsageError(
            f"{path / CONFIG}: 'model' is not a model config ({err}); {_reexport_hint(path)}"
        ) from err
    model = GPT(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"{path}: weights do not match config.json ({err})") from err
    model.eval()
    try:
        tokenizer = Tokenizer.from_spec(config["tokenizer"])
    except UsageError as err:
        raise UsageError(f"export {path}: {err}") from err
    return Export(
        path, model, model_cfg, tokenizer, VocabMap.from_json(config["vocab"]), ExportInfo.from_json(config)
    )


# --------------------------------------------------------------------------------------------------
# Resumable state
# --------------------------------------------------------------------------------------------------


def state_path(run_dir: Path, step: int) -> Path:
    """Where the resumable state of `step` lives (written by `save_state`)."""
    return run_dir / STATES / f"step_{step:07d}"


def state_dirs(run_dir: Path) -> list[Path]:
    """Every states/step_N folder, oldest first, intact or not (see `check_state`)."""
    root = run_dir / STATES
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def _file_record(file: Path) -> dict[str, Any]:
    return {"bytes": file.stat().st_size, "sha256": file_sha256(file)}


def _state_files(state_dir: Path) -> list[str]:
    return sorted(
        f.relative_to(state_dir).as_posix()
        for f in state_dir.rglob("*")
        if f.is_file() and f.name != MANIFEST
    )


def write_manifest(state_dir: Path) -> None:
    """manifest.json: the size and sha256 of every file of a state, written last (before the rename)."""
    files = {name: _file_record(state_dir / name) for name in _state_files(state_dir)}
    write_json(state_dir / MANIFEST, {"format": 1, "files": files})


@dataclass(frozen=True)
class StateCheck:
    """What `check_state` found: `damage` names the first bad file (None: intact); `verified` is
    False for a state saved before manifests existed, which has nothing to be checked against."""

    path: Path
    damage: str | None
    verified: bool


def check_state(state_dir: Path) -> StateCheck:
    """Check a resumable state against its manifest.json: every file present, unchanged, none added."""
    state_dir = Path(state_dir)
    if not (state_dir / MANIFEST).is_file():
        damage = _check_trainer_state(state_dir)
        return StateCheck(state_dir, damage, verified=False)
    try:
        files = json.loads((state_dir / MANIFEST).read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return StateCheck(
            state_dir, f"{state_dir / MANIFEST} is unreadable ({type(err).__name__}: {err})", True
        )
    for name in sorted(files):
        file = state_dir / name
        if not file.is_file():
            return StateCheck(state_dir, f"{file} is missing", True)
        if _file_record(file) != files[name]:
            return StateCheck(
                state_dir, f"{file} differs from its record in {MANIFEST} (damaged or changed)", True
            )
    extra = sorted(set(_state_files(state_dir)) - set(files))
    if extra:
        return StateCheck(state_dir, f"{state_dir / extra[0]} is not in its {MANIFEST} (added later)", True)
    return StateCheck(state_dir, _check_trainer_state(state_dir), verified=True)


def _check_trainer_state(state_dir: Path) -> str | None:
    file = state_dir / TRAINER_STATE
    if not file.is_file():
        return f"{file} is missing"
    try:
        json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{file} is not valid JSON ({err})"
    return None


def latest_state(run_dir: Path, warn: Any = print) -> Path | None:
    """The newest intact state of a run; each damaged newer one is skipped with a warning naming the file."""
    for state_dir in reversed(state_dirs(run_dir)):
        check = check_state(state_dir)
        if check.damage:
            warn(f"warning: skipping the damaged state {state_dir}: {check.damage}")
            continue
        if not check.verified:
            warn(_unverified(state_dir))
        return state_dir
    return None


def _unverified(state_dir: Path) -> str:
    return f"warning: {state_dir} has no {MANIFEST} (saved before checksums existed): resuming from it unverified"


def require_intact_state(state_dir: Path, warn: Any = print) -> None:
    """An explicitly named state must be intact: a damaged one is refused, naming the file and another state."""
    check = check_state(state_dir)
    if check.damage is None:
        if not check.verified:
            warn(_unverified(state_dir))
        return
    run_dir = state_dir.parent.parent
    others = [p for p in reversed(state_dirs(run_dir)) if p != state_dir and check_state(p).damage is None]
    fix = (
        f"resume from an intact state instead: --train.resume {others[0]}, or --train.resume auto "
        f"(the newest intact one)"
        if others
        else f"no other state of {run_dir} is intact: start a new run with another --out"
    )
    raise UsageError(f"cannot resume from {state_dir}: {check.damage}; {fix}")


def remove_litter(run_dir: Path) -> list[Path]:
    """Clear what an interrupted atomic write left in a run folder; main process, at the run's start.

    Temporary folders (`.best.tmp-PID`, `.last.tmp-PID`, `states/.step_N.tmp`) are removed; a
    `.NAME.old-PID` folder is the previous artifact, put back when NAME is missing (the crash came
    between the two renames) and removed otherwise. Returns what was removed or put back.
    """
    touched = []
    for root in (run_dir, run_dir / STATES):
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            match = _LITTER.fullmatch(entry.name)
            if match is None or entry.is_symlink() or not entry.is_dir():
                continue
            dest = root / match["name"]
            if match["kind"] == "old" and not dest.exists():
                os.replace(entry, dest)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            touched.append(entry)
    return touched


def save_state(accelerator: Any, run_dir: Path, trainer_state: dict[str, Any], keep: int) -> Path:
    """accelerator.save_state + trainer_state.json into states/step_N, then prune; all ranks call it.

    Older states are pruned only once the new one is in place: a failed write (disk full, read-only
    folder) removes the temporary folder, keeps every earlier state and raises a WriteError.
    """
    step = int(trainer_state["step"])
    dest = state_path(run_dir, step)
    tmp = run_dir / STATES / f".step_{step:07d}.tmp"
    main = accelerator.is_main_process
    with writing(dest, "the resumable state", cleanup=remove_tree(tmp) if main else None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            write_json(tmp / TRAINER_STATE, trainer_state)
            write_manifest(tmp)
            _swap_into_place(tmp, dest)
    if main:
        for old in state_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return dest


def load_state(accelerator: Any, state_dir: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Restore a resumable state after checking it belongs to the same model and batch layout."""
    trainer_state = _read_json(
        state_dir / TRAINER_STATE,
        "resume from another state (--train.resume auto picks the newest intact one)",
    )
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
