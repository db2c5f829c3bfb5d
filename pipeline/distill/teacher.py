"""The teacher as a frozen function: frozen, checked against the data, its layers mapped and its heads ranked by ablation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.data.shards import TokenData
from pipeline.distill.config import DistillConfig
from pipeline.errors import UsageError

# Head ablation lives in the eval layer (pretraining's probe uses it too); re-exported for distillation.
from pipeline.eval.heads import (  # noqa: F401
    ablate_head,
    describe_importance,
    head_importance,
    head_importance_scalars,
)
from pipeline.model.gpt import GPT
from pipeline.run.checkpoint import CONFIG, Export, read_export_config, resolve_export


def freeze(model: GPT) -> GPT:
    """A frozen function: eval mode, no gradients (so no optimizer can ever step it)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _tokenizer_identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "path"}  # a .tiktoken file is known by its sha256


def check_teacher_data(export: Export, data: TokenData) -> None:
    """Refuse data tokenized differently from the teacher, before any work."""
    teacher_spec = _tokenizer_identity(export.tokenizer.spec)
    data_spec = _tokenizer_identity(data.meta["tokenizer"])
    if teacher_spec != data_spec or export.vocab.full_size != data.vocab_size:
        trained_on = export.info.data.dir if export.info.data is not None else "?"
        raise UsageError(
            f"the teacher {export.path} uses tokenizer {export.tokenizer.name} ({export.vocab.full_size:,} ids) but "
            f"{data.dir} is tokenized with {data.meta['encoding']} ({data.vocab_size:,} ids); teacher and student "
            f"must share the tokenizer: pass the teacher's data folder ({trained_on}) "
            f"or tokenize the teacher's corpus with recipes/tokenize.py --encoding {export.tokenizer.name}"
        )


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer behind each student layer: evenly spaced, first and last kept (one layer: the first)."""
    if n_student > n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot be mapped onto a teacher of {n_teacher}")
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def teacher_windows(export_dir: str | Path) -> tuple[int, int, int]:
    """(seq_len, micro_batch_size, grad_accum_steps) the teacher was trained with, from its run's config.json.

    The run folder is the one the export names (its "run"), else the folder holding the export (a run's
    best/ or last/). No weights are read.
    """
    export_dir = resolve_export(export_dir)
    run = read_export_config(export_dir).get("run", "")
    candidates = [Path(run) / CONFIG] if run else []
    candidates.append(export_dir.parent / CONFIG)  # a run's config.json has the export's file name
    for file in candidates:
        try:
            saved = json.loads(file.read_text())
            return (
                int(saved["data"]["seq_len"]),
                int(saved["train"]["micro_batch_size"]),
                int(saved["train"].get("grad_accum_steps", 1)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise UsageError(
        f"the teacher {export_dir} was trained with unknown windows and batch: no readable run config.json "
        f"({', '.join(str(c) for c in candidates)}); set them with --data.seq-len N and --train.micro-batch-size N"
    )


def with_teacher_windows(cfg: DistillConfig, export_dir: str | Path) -> DistillConfig:
    """cfg with data.seq_len and train.micro_batch_size (and grad_accum_steps) left at 0 taken from the teacher's training."""
    if cfg.data.seq_len and cfg.train.micro_batch_size:
        return cfg
    seq_len, micro, accum = teacher_windows(export_dir)
    data, train = cfg.data, cfg.train
    if not data.seq_len:
        data = dataclasses.replace(data, seq_len=seq_len)
    if not train.micro_batch_size:
        train = dataclasses.replace(train, micro_batch_size=micro, grad_accum_steps=accum)
    return dataclasses.replace(cfg, data=data, train=train)  # DistillConfig's checks run again
