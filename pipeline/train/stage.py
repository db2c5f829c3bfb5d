"""Set-up shared by the training stages: the run context, data, run folder, resume, checkpoints, the closing summary.

Each function does one step of a recipe's `main`, so pretrain and distill read as the same
sequence of calls and differ only where the stages differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline.accel import attention_kernel, device_description, last_precision_decision, peak_memory_gib
from pipeline.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TokenizeConfig, TrainConfig
from pipeline.data import tokenize
from pipeline.data.shards import TokenData, TrainWindows, eval_batches
from pipeline.data.tokenizer import check_encodable
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError, closest
from pipeline.files import environment
from pipeline.model.gpt import GPT
from pipeline.model.memory import account_lines, human, model_account
from pipeline.run import checkpoint, huggingface
from pipeline.run.folder import RunDir, default_run_dir, latest_run_dir, point_latest
from pipeline.run.tracking import Reporter
from pipeline.train.batching import BatchPlan
from pipeline.train.loop import Loop, TrainState
from pipeline.train.losses import loss_chunk_rows
from pipeline.train.optim import build_optimizer


@dataclass(frozen=True)
class RunContext:
    """What every step of a training stage works with, passed as one argument.

    Built once the run folder is open and the reporter exists; the steps before that
    (resolve_lm, open_run, prepare_model, resume_state) take their few inputs directly.
    """

    accelerator: Accelerator
    run: RunDir
    report: Reporter
    data: TokenData
    vocab: VocabMap
    plan: BatchPlan
    stage: str = ""
    """pretrain or distill: names <runs root>/latest/<stage> when the run finishes (empty: no link)."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def prepare_data(accelerator: Accelerator, cfg: DataConfig, progress: bool = True) -> TokenData:
    """Open the tokenized data; the default folder is tokenized first (by one process) if missing."""
    if cfg.dir:
        return TokenData.open(cfg.dir)
    tok_cfg = TokenizeConfig(input=cfg.corpus, encoding=cfg.encoding)
    out = tokenize.default_out(tok_cfg)
    if (out / tokenize.META).is_file():  # every process checks: a refusal leaves none at the barrier below
        tokenize.check_reuse(tok_cfg, out)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (out / tokenize.META).is_file():
            print(f"{out} is missing: running the tokenize stage first", flush=True)
            tokenize.tokenize(tok_cfg, progress=progress)
    return TokenData.open(out)


def resolve_model_config(model: ModelConfig, data: TokenData, vocab: VocabMap) -> ModelConfig:
    """The model's shape with vocab_size set from the data; a configured size must match the data's."""
    if model.vocab_size and model.vocab_size not in (data.vocab_size, vocab.n_classes):
        raise UsageError(
            f"model.vocab_size={model.vocab_size} differs from the data's vocabulary ({data.meta['encoding']}, "
            f"{data.vocab_size:,} ids in {data.dir / 'meta.json'}); drop --model.vocab-size or use data tokenized "
            f"with the matching encoding"
        )
    return dataclasses.replace(model, vocab_size=vocab.n_classes)


def resolve_lm(
    accelerator: Accelerator, data_cfg: DataConfig, model_cfg: ModelConfig, progress: bool = True
) -> tuple[TokenData, VocabMap, DataConfig, ModelConfig]:
    """Data, vocabulary map, and the data/model configs resolved against them (what config.json records)."""
    data = prepare_data(accelerator, data_cfg, progress=progress)
    vocab = VocabMap.from_meta(data.meta, data_cfg.compact_vocab)
    model_cfg = resolve_model_config(model_cfg, data, vocab)
    data_cfg = dataclasses.replace(data_cfg, dir=str(data.dir), encoding=data.meta["encoding"])
    return data, vocab, data_cfg, model_cfg


def check_sample_prompt(data: TokenData, train: TrainConfig) -> None:
    """Fail at start-up, not at the first evaluation, when the logged samples' prompt cannot be encoded."""
    if train.sample_tokens:
        check_encodable(data.tokenizer, train.sample_prompt, "--train.sample-prompt")


def choose_attention_kernel(accelerator: Accelerator, model: GPT, requested: str = "auto") -> None:
    """--train.attention-kernel for a model this run computes with (trained or frozen); auto: accel's choice."""
    auto = attention_kernel(accelerator.device, accelerator.mixed_precision)
    model.set_attention_kernel(auto if requested == "auto" else requested)


def init_from_gpt2(
    run: RunDir,
    model: GPT,
    folder: str,
    parts: huggingface.InitParts,
    vocab: VocabMap,
    encoding: str,
    resume_from: Path | None,
    flag: str = "--init-from",
) -> GPT:
    """`model` with a transformers GPT-2 folder's weights (all, or the embeddings), recorded in init_from.json.

    Only a fresh run with `folder` set loads them (every rank, so all start equal); a resumed run
    restores its state instead, and its init_from.json stays the one its start wrote.
    """
    if folder and resume_from is None:
        record = huggingface.init_from_gpt2(model, folder, parts, vocab, encoding, flag)
        run.write("init_from.json", record)
        if run.main:
            print(f"initialised {len(record['loaded'])} weights ({parts}) from {folder}", flush=True)
    return model


def prepare_model(
    accelerator: Accelerator, model: GPT, train: TrainConfig, optim: OptimConfig
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, int]]:
    """Optimizer, Accelerate's wrapping (DDP/FSDP, precision); plus parameter counts."""
    model.activation_checkpointing = train.activation_checkpointing
    choose_attention_kernel(accelerator, model, train.attention_kernel)
    counts = model.param_counts()
    optimizer = build_optimizer(model, optim)
    model, optimizer = accelerator.prepare(model, optimizer)  # --train.compile: the Loop compiles its step
    return model, optimizer, counts


def train_windows(ctx: RunContext, train: TrainConfig, sampling: str) -> TrainWindows:
    """This rank's training windows (see pipeline/data/tokenize.py)."""
    acc, plan = ctx.accelerator, ctx.plan
    return TrainWindows(
        ctx.data.train,
        plan.seq_len,
        plan.micro_batch_size,
        plan.grad_accum_steps,
        train.seed,
        acc.process_index,
        acc.num_processes,
        ctx.vocab,
        sampling,
    )


def val_batches(ctx: RunContext, train: TrainConfig) -> list:
    """This rank's share of the fixed evaluation windows (train.eval_tokens of the val split)."""
    acc, plan = ctx.accelerator, ctx.plan
    return eval_batches(
        ctx.data.val,
        plan.seq_len,
        train.eval_tokens,
        plan.micro_batch_size,
        acc.process_index,
        acc.num_processes,
        ctx.vocab,
    )


def describe_start(ctx: RunContext, counts: dict[str, int], model: GPT) -> None:
    """The start-up summary every training stage prints, also TensorBoard's text card run/start.

    Also the memory account of the trained model (`model`, unwrapped) at this run's micro-batch: its
    total printed, the whole account written to memory.json and to the text card run/memory.
    """
    report, data, vocab = ctx.report, ctx.data, ctx.vocab
    compact = (
        f" ({vocab.n_classes - 1:,} ids seen in train + other, of {vocab.full_size:,})"
        if vocab.compact
        else ""
    )
    lines = [
        f"run folder: {ctx.run.path}",
        f"device: {device_description(ctx.device)}, precision {ctx.accelerator.mixed_precision}"
        + (f" ({why})" if (why := precision_reason(ctx.accelerator.mixed_precision)) else ""),
        f"data: {data.dir} ({data.meta['encoding']}, {len(data.train):,} train / {len(data.val):,} val tokens)",
        f"vocabulary: {vocab.n_classes:,} output classes{compact}",
        "parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + f" ({counts['total'] / 1e6:.2f}M)",
        ctx.plan.describe(),
    ]
    if isinstance(model, GPT):
        precision = ctx.accelerator.mixed_precision
        rows = loss_chunk_rows(model.cfg.vocab_size)
        account = model_account(model, ctx.plan.micro_batch_size, ctx.plan.seq_len, precision, rows)
        ctx.run.write("memory.json", account.to_json())
        table = account_lines(account, scaling=False, all_rows=False)
        report.text("run/memory", "\n".join(table), 0)
        lines.append(memory_line(account))
    for line in lines:
        report.print(line)
    report.text("run/start", "\n".join(lines), 0)
    report.layout(LOSS_CHARTS)


def memory_line(account: Any) -> str:
    """One line of the memory account: the total and its three largest counted terms."""
    counted = sorted((r for r in account.rows if r.counted), key=lambda r: -r.bytes)[:3]
    terms = ", ".join(f"{r.name} {human(r.bytes)}" for r in counted)
    return (
        f"memory: {human(account.total)} per process for a step (analytic: {terms}, ...); "
        "every term in memory.json and TensorBoard's text card run/memory"
    )


def run_hparams(
    config: Mapping[str, Any], model: ModelConfig, plan: BatchPlan, precision: str
) -> dict[str, Any]:
    """This run's row in TensorBoard's HParams view: the few settings that tell runs apart, the same for both stages.

    Short names, because TensorBoard sorts the columns by name and ticks only the first five (here
    d_model, lr, n_heads, n_layers, positions); pretrain rows say student_init "scratch" and
    student_kd_loss "none" (alpha 1: the labels only), so teachers and students sit in one table.
    Every setting is in config.json.
    """
    student, kd = config.get("student") or {}, config.get("kd") or {}
    return {  # sorted by name, the first five are the shape and the learning rate
        "d_model": model.d_model,
        "lr": (config.get("optim") or {}).get("lr", 0.0),
        "n_heads": model.n_heads,
        "n_layers": model.n_layers,
        "positions": model.positions,
        "precision": precision,
        "preset": config.get("preset", ""),
        "seq_len": plan.seq_len,
        "student_init": student.get("init", "scratch"),
        "student_kd_alpha": kd.get("alpha", 1.0),
        "student_kd_loss": kd.get("loss", "none"),
        "tokenizer": (config.get("data") or {}).get("encoding", ""),
        "tokens_per_step": plan.tokens_per_step,
    }


LOSS_CHARTS = {
    "loss": {
        "train and val loss": ["^Loss/train$", "^Loss/val$"],
        "clean train loss (eval mode, fixed windows) and val loss": ["^Loss/train_clean$", "^Loss/val$"],
        "distillation: CE on the labels, soft loss, their mix, val loss": [
            "^Loss/train$", "^Loss/kd$", "^Loss/total$", "^Loss/val$",
        ],
    }
}  # fmt: skip
"""The Custom Scalars dashboard: train and val loss on one chart, so overfitting shows in one view."""


def finish(
    ctx: RunContext,
    loop: Loop,
    state: TrainState,
    config: dict[str, Any],
    counts: dict[str, int],
    extra: dict[str, Any] | None = None,
    closing: tuple[str, ...] = (),
) -> dict[str, Any]:
    """result.json, the embedding projector, hyperparameters with final metrics, the closing lines.

    A finished run becomes <runs root>/latest/<stage> (when it lies under the runs root).
    """
    report, run, last = ctx.report, ctx.run, loop.last_eval
    result = {
        "step": state.step,
        "tokens": state.tokens,
        "epochs": ctx.plan.epoch(state.step),
        "wall_time_s": state.elapsed,
        "tokens_per_s": state.tokens / max(state.elapsed, 1e-9),
        "best_val_loss": state.best_val,
        "best_step": state.best_step,
        "final_val_loss": last.get("val_loss"),
        "final_val_bpb": last.get("val_bpb"),
        "stopped_early": state.stopped_early,
        "skipped_steps": state.skipped_steps,
        "final": last,
        "parameters": counts,
        "peak_mem_gib": peak_memory_gib(ctx.device),
        "noise_scale": loop.grad_noise.result() if loop.grad_noise is not None else None,
        "initial_val_loss": state.initial_val_loss,  # step 0, before any update (--train.eval-at-start)
        "ln_vocab": state.ln_vocab,  # the loss of a uniform prediction over the output classes
        "ln_full_vocab": state.ln_full_vocab,
        **(extra or {}),
    }
    write_projector(ctx, ctx.accelerator.unwrap_model(loop.model), loop.cfg.projector_tokens, state.step)
    model_cfg = ctx.accelerator.unwrap_model(loop.model).cfg
    hparams = run_hparams(config, model_cfg, ctx.plan, ctx.accelerator.mixed_precision)
    report.hparams(hparams, {"best_val_loss": state.best_val, **last})
    run.write_result(result)
    exports = [str(run.path / name) for name in ("best", "last") if (run.path / name).is_dir()]
    report.end_progress()
    report.print(
        f"done: {state.step:,} steps, {state.tokens:,} tokens in {state.elapsed:.0f} s "
        f"({result['tokens_per_s']:,.0f} tokens/s); best val loss {state.best_val:.4f} at step {state.best_step}"
        + (f"; exports in {' and '.join(exports)}" if exports else "; no exports")
    )
    for line in closing:
        report.print(line)
    if not (state.step >= ctx.plan.total_steps or state.stopped_early):  # fit's only other exit: stop-at
        saved = checkpoint.state_path(run.path, state.step)  # fit's last save: no need to hash it again
        report.print(
            f"stopped at step {state.step:,} of {ctx.plan.total_steps:,} (--train.stop-at) with a resumable "
            f"state in {saved}; continue with --train.resume auto --out {run.path}"
        )
    elif ctx.stage and ctx.accelerator.is_main_process:
        point_latest(ctx.stage, run.path)
    report.close()
    return result


def open_run(
    accelerator: Accelerator, stage: str, preset: str, out: str, resume: str
) -> tuple[RunDir, Path | None]:
    """The run folder and the state to resume from (None for a fresh run); same answer on every rank."""
    choice: list[Any] = [None, None]
    if accelerator.is_main_process:
        choice = _choose_run(stage, preset, out, resume)
    broadcast_object_list(choice, from_process=0) if accelerator.num_processes > 1 else None
    path, state = choice
    run = RunDir(Path(path), main=accelerator.is_main_process)  # refuses planted symlinks first
    if accelerator.is_main_process:
        checkpoint.remove_litter(run.path)  # temporary folders of an interrupted write
    return run, None if state is None else Path(state)


def _choose_run(stage: str, preset: str, out: str, resume: str) -> list[str | None]:
    if resume and resume != "auto":
        state = Path(resume)
        if not (state / checkpoint.TRAINER_STATE).is_file():
            raise UsageError(
                f"--train.resume {resume}: not a resumable state (no {checkpoint.TRAINER_STATE})"
            )
        checkpoint.require_intact_state(state)
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
    if RunDir.holds_run(run_dir) and resume != "auto":  # a run that failed before its first step may rerun
        raise UsageError(
            f"run folder {run_dir} already holds a run; continue it with --train.resume auto or choose another --out"
        )
    return [str(run_dir), None]


# Settings a resumed run may change without --train.amend: budgets, intervals, logging, where it runs.
# Everything else (data, tokenizer, model, seed, batch plan, optimizer, ...) would break exactness.
FREE_ON_RESUME = frozenset(
    {"out", "config"}
    | {
        f"train.{name}"
        for name in (
            "max_steps", "max_epochs", "max_tokens", "eval_interval", "eval_tokens", "log_interval",
            "histogram_interval", "keep_states", "resume", "stop_at", "progress", "threads", "amend",
            "early_stop_patience", "early_stop_min_delta", "sample_tokens", "sample_prompt",
            "projector_tokens", "dist_timeout", "nonfinite", "max_skipped_steps",
            "eval_at_start", "clean_train_tokens", "grad_stats",
        )
    }
    | {f"train.probe.{f.name}" for f in dataclasses.fields(ProbeConfig)}  # probes never change training
)  # fmt: skip


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted.key: value} (resume checks, the comparison study's reuse check)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(
    run: RunDir, config: dict[str, Any], resume_from: Path | None, amend: tuple[str, ...]
) -> None:
    """Compare a resumed run's whole resolved config with the one in its run folder, before any work.

    Changes that break exactness are refused, listing the fields, unless named in --train.amend;
    named changes are recorded in amendments.json. config.original.json keeps the first config once
    any setting changed (config.json then describes the run as it goes on).
    """
    saved_path = run.path / "config.json"
    if resume_from is None or not saved_path.is_file():
        return
    saved, now = flat_config(json.loads(saved_path.read_text())), flat_config(json.loads(json.dumps(config)))
    unknown = [name for name in amend if name not in now]
    if unknown:
        raise UsageError(
            f"--train.amend names {', '.join(unknown)}, which the config has not"
            f"{closest(unknown[0], list(now))}; name dotted fields such as optim.lr"
        )
    changed = {
        k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)
    }
    refused = {k: v for k, v in changed.items() if k not in FREE_ON_RESUME and k not in amend}
    if refused:
        listing = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in refused.items())
        raise UsageError(
            f"cannot resume {run.path}: these settings differ from its config.json and would break exactness: "
            f"{listing}. Resume with the run's settings, start a new run with another --out, or name the "
            f"changes you mean with --train.amend {' '.join(refused)} (recorded in amendments.json)"
        )
    if changed and run.main and not (run.path / "config.original.json").is_file():
        run.write("config.original.json", json.loads(saved_path.read_text()))  # the first config, kept
    amended = {k: {"saved": old, "now": new} for k, (old, new) in changed.items() if k in amend}
    if amended and run.main:
        path = run.path / "amendments.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        run.write("amendments.json", [*history, {"resumed_from": str(resume_from), "changes": amended}])


def write_run_files(run: RunDir, accelerator: Accelerator, config: dict[str, Any]) -> None:
    """config.json (the resolved configuration) and env.json (where and with what the run ran)."""
    run.write_config(config)
    env = environment(
        device_description(accelerator.device), accelerator.num_processes, accelerator.mixed_precision
    )
    reason = precision_reason(accelerator.mixed_precision)
    run.write_env(env | ({"precision_reason": reason} if reason else {}))


def precision_reason(precision: str) -> str:
    """How --train.precision reached `precision` (the CPU's flags, a measurement, the request); '' if unknown."""
    decided = last_precision_decision()
    return decided[1] if decided is not None and decided[0] == precision else ""


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
    ctx: RunContext,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    info: checkpoint.ExportInfo,
    expect: dict[str, Any],
    keep: int,
) -> Callable[[TrainState, bool, bool], None]:
    """checkpoint_fn for the loop: state at every evaluation, `best` on improvement, `last` at the end."""
    accelerator, run, vocab, tokenizer = ctx.accelerator, ctx.run, ctx.vocab, ctx.data.tokenizer
    saved_steps: set[int] = set()

    def export(name: str, state: TrainState) -> None:
        # Every rank gathers (a collective under FSDP, whose own state_dict() holds shards); rank 0 writes.
        weights = checkpoint.gathered_state_dict(accelerator, model)
        if accelerator.is_main_process:
            meta = info.at(state.step, state.tokens, state.best_val).to_json()
            checkpoint.export_model(run.path / name, weights, model_cfg, tokenizer.spec, vocab, meta)

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


def frequent_tokens(ctx: RunContext, n: int) -> tuple[list[int], torch.Tensor]:
    """The n most frequent train tokens: their ids, and their rows of the (possibly compacted) embedding."""
    counts = ctx.data.meta["token_counts"]
    order = sorted(range(len(counts["ids"])), key=lambda i: -counts["counts"][i])[:n]
    ids = [counts["ids"][i] for i in order]
    return ids, torch.as_tensor(ctx.vocab.to_compact(np.asarray(ids, dtype=np.int64)))


def write_projector(ctx: RunContext, model: torch.nn.Module, n: int, step: int) -> None:
    """The most frequent tokens' input embeddings to TensorBoard's projector (exercise H6.5).

    One snapshot per step (<tb>/<step>/token_embedding, listed as token_embedding:<step>); the
    embedding probe writes them at step 0 and each evaluation, finish() the final one.
    """
    if n <= 0 or not ctx.report.main:
        return
    ids, rows = frequent_tokens(ctx, n)
    weight = model.tok_emb.weight.detach()[rows.to(model.tok_emb.weight.device)]
    ctx.report.embedding(weight, ctx.data.tokenizer.token_strings(ids), step, tag="token_embedding")


def clean_train_batches(ctx: RunContext, train: TrainConfig) -> list:
    """Fixed train windows for the eval-mode train_clean_loss (--train.clean-train-tokens; [] when off)."""
    tokens = train.eval_tokens if train.clean_train_tokens < 0 else train.clean_train_tokens
    if tokens == 0:
        return []
    acc, plan = ctx.accelerator, ctx.plan
    return eval_batches(
        ctx.data.train,
        plan.seq_len,
        tokens,
        plan.micro_batch_size,
        acc.process_index,
        acc.num_processes,
        ctx.vocab,
    )
