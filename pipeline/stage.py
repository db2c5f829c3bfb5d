"""Set-up shared by the training stages: data, run folder, resume, checkpoints, eval-time probes.

Each function does one step of a recipe's `main`, so pretrain and distill read as the same
sequence of calls and differ only where the stages differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline import checkpoint, shards
from pipeline.cli import UsageError
from pipeline.config import DataConfig, ModelConfig, TokenizeConfig
from pipeline.data import TokenData
from pipeline.evaluation import attention_scalars, attention_stats
from pipeline.generation import SamplingConfig, generate
from pipeline.runs import RunDir, default_run_dir, environment, latest_run_dir
from pipeline.tokenizer import Tokenizer
from pipeline.tracking import Reporter
from pipeline.train import TrainState
from pipeline.vocab import VocabMap


def prepare_data(accelerator: Accelerator, cfg: DataConfig, progress: bool = True) -> TokenData:
    """Open the tokenized data; the default folder is tokenized first (by one process) if missing."""
    if cfg.dir:
        return TokenData.open(cfg.dir)
    tok_cfg = TokenizeConfig(input=cfg.corpus, encoding=cfg.encoding)
    out = shards.default_out(tok_cfg)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (out / shards.META).is_file():
            print(f"{out} is missing: running the tokenize stage first", flush=True)
            shards.tokenize(tok_cfg, progress=progress)
    return TokenData.open(out)


def data_info(data: TokenData) -> dict[str, Any]:
    """What an export records about the data it was trained on."""
    meta = data.meta
    return {
        "dir": str(data.dir),
        "encoding": meta["encoding"],
        "vocab_size": meta["vocab_size"],
        "train_tokens": meta["train_tokens"],
        "bytes_per_token": data.bytes_per_token,
        "source_sha256": meta["source"]["sha256"],
    }


def resolve_model_config(model: ModelConfig, data: TokenData, vocab: VocabMap) -> ModelConfig:
    """The model's shape with vocab_size set from the data; a configured size must match the data's."""
    if model.vocab_size and model.vocab_size not in (data.vocab_size, vocab.n_classes):
        raise UsageError(
            f"model.vocab_size={model.vocab_size} differs from the data's vocabulary ({data.meta['encoding']}, "
            f"{data.vocab_size:,} ids in {data.dir / 'meta.json'}); drop --model.vocab-size or use data tokenized "
            f"with the matching encoding"
        )
    return dataclasses.replace(model, vocab_size=vocab.n_classes)


def open_run(
    accelerator: Accelerator, stage: str, preset: str, out: str, resume: str
) -> tuple[RunDir, Path | None]:
    """The run folder and the state to resume from (None for a fresh run); same answer on every rank."""
    choice: list[Any] = [None, None]
    if accelerator.is_main_process:
        choice = _choose_run(stage, preset, out, resume)
    broadcast_object_list(choice, from_process=0) if accelerator.num_processes > 1 else None
    path, state = choice
    return RunDir(Path(path), main=accelerator.is_main_process), None if state is None else Path(state)


def _choose_run(stage: str, preset: str, out: str, resume: str) -> list[str | None]:
    if resume and resume != "auto":
        state = Path(resume)
        if not (state / checkpoint.TRAINER_STATE).is_file():
            raise UsageError(
                f"--train.resume {resume}: not a resumable state (no {checkpoint.TRAINER_STATE})"
            )
        return [str(Path(out) if out else state.parent.parent), str(state)]
    if resume == "auto":
        run_dir = Path(out) if out else latest_run_dir(stage, preset, checkpoint.STATES)
        state = checkpoint.latest_state(run_dir) if run_dir else None
        if state is not None:
            return [str(run_dir), str(state)]
        print(
            f"--train.resume auto: no resumable state found{f' in {run_dir}' if run_dir else ''}; starting fresh"
        )
    run_dir = Path(out) if out else default_run_dir(stage, preset)
    if (run_dir / "config.json").is_file() and resume != "auto":
        raise UsageError(
            f"run folder {run_dir} already holds a run; continue it with --train.resume auto or choose another --out"
        )
    return [str(run_dir), None]


def write_run_files(run: RunDir, accelerator: Accelerator, config: dict[str, Any]) -> None:
    run.write_config(config)
    run.write_env(environment(accelerator.device, accelerator.num_processes, accelerator.mixed_precision))


def resume_state(accelerator: Accelerator, state_dir: Path | None, expect: dict[str, Any]) -> TrainState:
    if state_dir is None:
        return TrainState()
    expect = json.loads(json.dumps(expect))
    saved = checkpoint.load_state(accelerator, state_dir, expect)
    state = TrainState.from_json(saved["train_state"])
    if accelerator.is_main_process:
        print(f"resumed from {state_dir} at step {state.step:,} ({state.tokens:,} tokens)", flush=True)
    return state


def make_checkpointer(
    accelerator: Accelerator,
    run: RunDir,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    vocab: VocabMap,
    info: dict[str, Any],
    expect: dict[str, Any],
    keep: int,
) -> Callable[[TrainState, bool, bool], None]:
    """checkpoint_fn for the loop: state at every evaluation, `best` on improvement, `last` at the end."""
    saved_steps: set[int] = set()

    def export(name: str, state: TrainState) -> None:
        if accelerator.is_main_process:
            meta = info | {"step": state.step, "tokens": state.tokens, "best_val_loss": state.best_val}
            checkpoint.export_model(
                run.path / name, accelerator.unwrap_model(model), model_cfg, tokenizer.spec, vocab, meta
            )

    def checkpoint_fn(state: TrainState, improved: bool, final: bool) -> None:
        if improved:
            export("best", state)
        if state.step not in saved_steps:
            trainer_state = json.loads(json.dumps(expect)) | {
                "step": state.step,
                "train_state": state.to_json(),
            }
            checkpoint.save_state(accelerator, run.path, trainer_state, keep)
            saved_steps.add(state.step)
        if final:
            export("last", state)
        accelerator.wait_for_everyone()

    return checkpoint_fn


def make_probe(
    accelerator: Accelerator,
    model: torch.nn.Module,
    report: Reporter,
    probe_batch: torch.Tensor,
    tokenizer: Tokenizer,
    vocab: VocabMap,
    prompt: str,
    sample_tokens: int,
    seed: int,
) -> Callable[[int], None]:
    """probe_fn: attention entropy per head and a text sample at every evaluation (rank 0)."""

    def probe(step: int) -> None:
        stats = attention_stats(model, probe_batch.to(accelerator.device))
        report.scalars(step, attention_scalars(stats), record=False)
        if sample_tokens and accelerator.is_main_process:
            raw = accelerator.unwrap_model(model)
            ids = torch.as_tensor(vocab.to_compact(_encode(tokenizer, prompt)))[None].to(accelerator.device)
            generator = torch.Generator(device=accelerator.device).manual_seed(seed)
            with accelerator.autocast():
                out = generate(
                    raw,
                    ids,
                    SamplingConfig(max_new_tokens=sample_tokens, temperature=0.8, top_k=200),
                    generator,
                    vocab=vocab,
                )
            report.text("samples", tokenizer.decode(vocab.to_full(out[0], generator=None)), step)

    return probe


def _encode(tokenizer: Tokenizer, prompt: str):
    import numpy as np

    ids = tokenizer.encode(prompt) if prompt else []
    return np.asarray(ids or [0], dtype=np.int64)


def write_projector(
    report: Reporter,
    model: torch.nn.Module,
    data: TokenData,
    tokenizer: Tokenizer,
    vocab: VocabMap,
    n: int,
    step: int,
) -> None:
    """The most frequent tokens' input embeddings to TensorBoard's projector (exercise H6.5)."""
    if n <= 0 or not report.main:
        return
    counts = data.meta["token_counts"]
    order = sorted(range(len(counts["ids"])), key=lambda i: -counts["counts"][i])[:n]
    ids = [counts["ids"][i] for i in order]
    import numpy as np

    rows = torch.as_tensor(vocab.to_compact(np.asarray(ids, dtype=np.int64)))
    weight = model.tok_emb.weight.detach()[rows]
    report.embedding(weight, tokenizer.token_strings(ids), step, tag="token_embedding")
