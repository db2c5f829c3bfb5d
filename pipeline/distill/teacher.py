"""The teacher as a frozen function: frozen, checked against the data, its layers mapped and its heads ranked by ablation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
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
        alphabet = (
            "; a char tokenizer's alphabet is the characters of its corpus, so a char teacher distills on "
            "its own corpus"
            if teacher_spec.get("encoding") == data_spec.get("encoding") == "char"
            else ""
        )
        raise UsageError(
            f"the teacher {export.path} uses tokenizer {export.tokenizer.name} ({export.vocab.full_size:,} ids) but "
            f"{data.dir} is tokenized with {data.meta['encoding']} ({data.vocab_size:,} ids); teacher and student "
            f"must share the tokenizer: pass the teacher's data folder ({trained_on}) "
            f"or tokenize the teacher's corpus with recipes/tokenize.py --encoding {export.tokenizer.name}{alphabet}"
        )


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer behind each student layer: evenly spaced, first and last kept (one layer: the first)."""
    if n_student > n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot be mapped onto a teacher of {n_teacher}")
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _run_configs(export_dir: Path) -> list[Path]:
    """Where the config.json of the run that made an export may be: the run the export names (its
    "run"), else the folder holding the export (a run's best/ or last/)."""
    run = read_export_config(export_dir).get("run", "")
    candidates = [Path(run) / CONFIG] if run else []
    candidates.append(export_dir.parent / CONFIG)  # a run's config.json has the export's file name
    return candidates


def teacher_windows(export_dir: str | Path) -> tuple[int, int, int]:
    """(seq_len, micro_batch_size, grad_accum_steps) the teacher was trained with, from its run's config.json.

    No weights are read.
    """
    export_dir = resolve_export(export_dir)
    candidates = _run_configs(export_dir)
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


def _teacher_corpus(export_dir: Path) -> str:
    """The corpus (--data.corpus) the teacher's run tokenized, from its run's config.json; '' unknown."""
    for file in _run_configs(export_dir):
        try:
            corpus = json.loads(file.read_text())["data"]["corpus"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(corpus, str) and corpus:
            return corpus
    return ""


def distill_data(data: DataConfig, export_dir: str | Path) -> DataConfig:
    """The data distillation reads, from --data.* and the teacher export (no weights are read).

    --data.dir: that folder. --data.corpus: that corpus, tokenized with the teacher's tokenizer.
    Neither: the teacher's data folder, or, where it is gone, the teacher's corpus tokenized again.
    --data.encoding, where given, must be the teacher's: teacher and student share one tokenizer.
    """
    export_dir = resolve_export(export_dir)
    saved = read_export_config(export_dir)
    encoding = (saved.get("tokenizer") or {}).get("encoding", "")
    if data.encoding and encoding and data.encoding != encoding:
        raise UsageError(
            f"--data.encoding {data.encoding}: the teacher {export_dir} uses the {encoding} tokenizer, and teacher "
            f"and student share one; drop --data.encoding (a --data.corpus is tokenized with the teacher's)"
        )
    encoding = encoding or data.encoding
    if data.dir:
        return data
    if data.corpus:
        return dataclasses.replace(data, encoding=encoding)
    teacher_dir = str((saved.get("data") or {}).get("dir", ""))
    if teacher_dir and (Path(teacher_dir) / "meta.json").is_file():
        return dataclasses.replace(data, dir=teacher_dir, encoding=encoding)
    corpus = _teacher_corpus(export_dir)
    if not corpus:
        raise UsageError(
            f"the teacher's data folder ({teacher_dir or 'not recorded in its export'}) is gone and no run "
            f"config.json of the teacher names its corpus; pass --data.dir DIR (tokenized with the teacher's "
            f"{encoding}) or --data.corpus FILE"
        )
    return dataclasses.replace(data, corpus=corpus, encoding=encoding)


def check_teacher_corpus(export_dir: str | Path, data: TokenData) -> None:
    """Refuse data that `distill_data` chose for the teacher (no --data.dir or --data.corpus) when its
    text is not the text the teacher was trained on: a data folder re-made from the corpus the
    teacher's run config names, where that run read a folder of another corpus (--data DIR)."""
    expected = (read_export_config(resolve_export(export_dir)).get("data") or {}).get("source_sha256")
    found = (data.meta.get("source") or {}).get("sha256")
    if expected and found and expected != found:
        raise UsageError(
            f"{data.dir} holds another text than the teacher {export_dir} was trained on (source sha256 "
            f"{found[:12]}... against {expected[:12]}...): its own data folder is gone and its run's "
            f"--data.corpus is not that text; pass --data.dir DIR or --data.corpus FILE to distill on it"
        )


def with_teacher_windows(cfg: DistillConfig, export_dir: str | Path) -> DistillConfig:
    """cfg with data.seq_len and train.micro_batch_size (and grad_accum_steps) left at 0 taken from the teacher's training."""
    if cfg.data.seq_len and cfg.train.micro_batch_size:
        return cfg
    if not cfg.train.micro_batch_size and cfg.train.grad_accum_steps != 1:
        raise UsageError(
            f"--train.grad-accum-steps {cfg.train.grad_accum_steps} with --train.micro-batch-size 0, which takes the "
            f"teacher's micro-batch and accumulation both: set --train.micro-batch-size N too"
        )
    seq_len, micro, accum = teacher_windows(export_dir)
    data, train = cfg.data, cfg.train
    if not data.seq_len:
        data = dataclasses.replace(data, seq_len=seq_len)
    if not train.micro_batch_size:
        train = dataclasses.replace(train, micro_batch_size=micro, grad_accum_steps=accum)
    return dataclasses.replace(cfg, data=data, train=train)  # DistillConfig's checks run again
