"""Evaluate exported models side by side: teacher-forced metrics, compounding errors, degeneration, attention.

    python recipes/evaluate.py --models runs/pretrain/shakespeare-A runs/distill/one_head-B --data DIR --out DIR
    python recipes/evaluate.py --models runs/pretrain/tiny-A --preset quick --out runs/evaluate/tiny   # CPU, seconds
    python recipes/evaluate.py --models STUDENT_A STUDENT_B --teacher TEACHER    # the teacher judges the students
    accelerate launch recipes/evaluate.py --models A B                           # one GPU (or the launch config's)
    accelerate launch --config_file launch/cpu_ddp.yaml recipes/evaluate.py --models A --preset quick   # 2 CPU processes

    python recipes/evaluate.py --models runs/pretrain/rope-A --seq-len 512     # loss by position past max_seq_len
    python recipes/evaluate.py --models A --rollouts greedy beam --beam-width 8    # choose the decoding modes

Each model continues the same M prompts of P tokens (seeded positions of the val split) by N tokens
in each mode of --rollouts (greedy, sampled, nucleus top-p, beam search), and is compared with the
true continuation: per-position accuracy a(k), exact-prefix survival S(k) against p^k, first
divergence, WER/CER, the exposure-bias gap, the teacher's verdict, repetition and loops, and the
model's own next-token entropy and max-probability along the rollout; plus val loss, bits per byte,
top-1/top-5, ECE, loss by position in the --seq-len window (past max_seq_len for rope, alibi,
sinusoidal or no positions: length extrapolation) and attention entropy. A model trained without
the causal mask gets its teacher-forced metrics twice: as trained (leaky) and with the mask (causal);
everything else is causal. Prompts are split over processes and gathered; sampled rollouts are
seeded per share.

The judge (teacher-as-judge metrics): --teacher EXPORT; else the first of --models when its export is
a teacher (kind "teacher") and more models follow; else none.

Names: --names, else each run folder's name without its timestamp (runs/pretrain/shakespeare-<time>/best
-> shakespeare), with -teacher/-student, -best/-last or -2 where two would collide; at most 24 characters.
The same names head report.md, the plots, metrics.json and the TensorBoard runs.

Writes to the run folder (default runs/evaluate/<first model's name>-<time>): report.md (read this),
metrics.json, plots/*.png, result.json, config.json, env.json, metrics.jsonl (one line per model), and
tb/ (TensorBoard: one run per model under tb/<name>, one tag per quantity, so models overlay on one card;
tag groups of evaluate's own: eval/, eval_attention/, compounding/, exposure_gap/, greedy/ ..., never a
training group such as attention/ or val/; the plots and the report in tb/ itself).
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.tensorboard import SummaryWriter

from pipeline import accel, cli
from pipeline.cli import to_dict
from pipeline.data.shards import TokenData, eval_batches
from pipeline.errors import UsageError
from pipeline.eval import compounding, plots, report
from pipeline.eval.config import ROLLOUT_MODES, EvaluateConfig
from pipeline.eval.results import AttentionResult, Context, ModelResult, Shape, TeacherForced
from pipeline.eval.teacher_forced import attention_summary, evaluate_lm
from pipeline.run import checkpoint
from pipeline.run.folder import RunDir, default_run_dir, point_latest
from pipeline.run.tracking import Reporter
from pipeline.train import stage


def default() -> EvaluateConfig:
    """Every rollout mode: greedy, sampled, nucleus, beam."""
    return EvaluateConfig(rollouts=ROLLOUT_MODES)


def quick() -> EvaluateConfig:
    """Seconds on a CPU: few, short prompts and a small bootstrap (tests, smoke runs)."""
    return dataclasses.replace(
        default(),
        prompts=24,
        prompt_tokens=8,
        new_tokens=16,
        gap_horizon=4,
        bootstrap=200,
        eval_tokens=4096,
        beam_width=2,
    )


PRESETS = {"default": default, "quick": quick}


# --------------------------------------------------------------------------------------------------
# Models, judge, run folder
# --------------------------------------------------------------------------------------------------


def pick_judge(
    cfg: EvaluateConfig, exports: list[checkpoint.Export]
) -> tuple[checkpoint.Export | None, int | None, str]:
    """The judge export, its place among the models (None: not one of them), and the rule that chose it
    (see the module docstring)."""
    if cfg.teacher:
        path = checkpoint.resolve_export(cfg.teacher)
        for i, export in enumerate(exports):
            if export.path.resolve() == path.resolve():
                return export, i, "--teacher"
        return checkpoint.load_export(path), None, "--teacher"
    if len(exports) > 1 and exports[0].info.kind == "teacher":
        return exports[0], 0, "the first of --models, a teacher export"
    return None, None, "none"


def name_models(
    cfg: EvaluateConfig, exports: list[checkpoint.Export]
) -> tuple[list[str], checkpoint.Export | None, str | None, str]:
    """The models' names (--names, else short readable ones: see compounding.model_names), the judge,
    its name and the rule that chose it."""
    judge, index, rule = pick_judge(cfg, exports)
    outside = judge if judge is not None and index is None else None
    names, outside_name = compounding.model_names(cfg.names, exports, outside)
    judge_name = outside_name if index is None else names[index]
    return names, judge, judge_name, rule


def open_run(accelerator: Any, cfg: EvaluateConfig, first_name: str) -> RunDir:
    """The run folder (the same on every process); refuses to overwrite an evaluation without --overwrite."""
    # runs/evaluate/<first model's name>-<time>: one timestamp, the name a model also has in tb/ and the report
    choice = [cfg.out or str(default_run_dir("evaluate", plots.safe_name(first_name)))]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    path = Path(choice[0])
    if (path / "metrics.json").is_file():
        if not cfg.overwrite:
            raise UsageError(
                f"{path} already holds an evaluation (metrics.json); pass --overwrite or another --out"
            )
        if accelerator.is_main_process:
            for old in ("tb", plots.PLOTS, "metrics.jsonl"):
                shutil.rmtree(path / old, ignore_errors=True) if (path / old).is_dir() else (
                    path / old
                ).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return RunDir(path, main=accelerator.is_main_process)


# --------------------------------------------------------------------------------------------------
# Data, windows, context, reporting
# --------------------------------------------------------------------------------------------------


def open_data(
    cfg: EvaluateConfig, exports: list[checkpoint.Export], everyone: dict[str, checkpoint.Export]
) -> TokenData:
    """--data, else the first model's training data; every model (and the judge) must read its tokenizer."""
    trained_on = exports[0].info.data
    data_dir = cfg.data or (trained_on.dir if trained_on is not None else "")
    if not data_dir:
        raise UsageError(
            f"{exports[0].path} does not record its data folder; pass --data DIR (the tokenized data)"
        )
    data = TokenData.open(data_dir)
    compounding.check_compatible(data.meta["tokenizer"], data.dir, everyone)
    return data


@dataclass(frozen=True)
class Bench:
    """What every model is measured on: the same data, prompts, windows and judge."""

    data: TokenData
    prompts: compounding.Prompts
    val: list  # this process's teacher-forced windows
    attention_x: torch.Tensor  # val windows for the attention statistics
    judge: checkpoint.Export | None
    judge_name: str | None


def make_context(
    cfg: EvaluateConfig, bench: Bench, models: dict[str, checkpoint.Export], judge_rule: str, seq_len: int
) -> Context:
    """What every model is measured on (metrics.json's context, config.json's resolved settings)."""
    prompts = bench.prompts
    return Context(
        data=str(bench.data.dir),
        models={name: str(e.path) for name, e in models.items()},
        judge=bench.judge_name,
        judge_rule=judge_rule,
        prompts=len(prompts),
        prompt_tokens=cfg.prompt_tokens,
        new_tokens=cfg.new_tokens,
        prompt_starts=prompts.starts.tolist(),
        seed=cfg.seed,
        sampled=cfg.sampled,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seq_len=seq_len,
        rollouts=list(compounding.rollout_configs(cfg)),
        beam_width=cfg.beam_width,
        nucleus=cfg.nucleus,
        eval_tokens=cfg.eval_tokens,
    )


def start_reporting(accelerator: Any, cfg: EvaluateConfig, run: RunDir, context: Context) -> Reporter:
    """The progress bar (each phase of each model, then the report) and TensorBoard, and the run's set-up printed."""
    phases = compounding.phases(cfg, context.judge is not None)
    rep = Reporter(accelerator, run, len(context.models) * len(phases) + 1, 0, cfg.progress)
    rep.print(f"run folder: {run.path}")
    rep.print(
        f"device: {accel.device_description(accelerator.device)}, precision {accelerator.mixed_precision}"
    )
    rep.print(
        f"data: {context.data}; {context.prompts} prompts of {cfg.prompt_tokens} tokens, {cfg.new_tokens} generated; "
        f"judge: {context.judge or 'none'} ({context.judge_rule})"
    )
    rep.print(
        f"teacher-forced metrics on {cfg.eval_tokens:,} val tokens (--eval-tokens) in windows of {context.seq_len}; "
        f"models: {', '.join(context.models)}; per model: {', '.join(phases)}"
    )
    return rep


def ticker(rep: Reporter, phases_done: list[int]) -> Any:
    """tick(model, phase): the bar counts the phases done and names the one starting (rank 0; --no-progress: silent)."""

    def tick(model: str, phase: str) -> None:
        bar = rep.bar
        bar.update(phases_done[0] - bar.n)
        bar.set_description(f"{model}: {phase}" if model else phase, refresh=True)
        phases_done[0] += 1

    return tick


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def honest(model: Any) -> None:
    """A model trained without the causal mask, with the mask on (set_causal), for every measurement
    but the leaky view: generation can only see the past."""
    if not getattr(model.cfg, "causal", True):
        model.set_causal(True)


def evaluate_model(
    export: checkpoint.Export, accelerator: Any, bench: Bench, cfg: EvaluateConfig, tick: Any
) -> ModelResult | None:
    """All metrics of one model (on the main process; None elsewhere)."""
    device, data, prompts, judge = accelerator.device, bench.data, bench.prompts, bench.judge
    model = export.model.to(device)
    share = np.arange(len(prompts))[accelerator.process_index :: accelerator.num_processes]
    tick("teacher-forced")
    with accelerator.autocast():
        leaky, causal = None, getattr(export.model_cfg, "causal", True)
        if not causal:  # the leaky view, as trained: mask off, each position sees its target
            model.set_causal(False)
            leaky = evaluate_lm(model, bench.val, accelerator, export.vocab, data.bytes_per_token)
        honest(model)
        tf = evaluate_lm(model, bench.val, accelerator, export.vocab, data.bytes_per_token)
        sums, counts = compounding.position_nll(model, bench.val, export.vocab, device)
        sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
        local = compounding.measure_model(
            model, export.vocab, export.tokenizer, prompts, share, cfg, device, judge and judge.model, tick
        )
        tick("attention")
        attention = attention_summary(
            model, bench.attention_x.to(device), cfg.collapse_threshold, cfg.map_tokens
        )
    shares = gather_object([local])
    if judge is None or model is not judge.model:
        export.model.to("cpu")
    if not accelerator.is_main_process:
        return None
    summary = compounding.summarize(compounding.merge_shares(shares), cfg, bench.judge_name)
    fields = ("n_layers", "n_heads", "d_model", "positions")
    shape = {k: getattr(export.model_cfg, k) for k in fields} | {"causal": causal}
    positions = compounding.summarize_positions(
        sums.cpu().numpy(), counts.cpu().numpy(), export.model_cfg.max_seq_len
    )
    return ModelResult(
        path=str(export.path),
        kind=export.info.kind,
        preset=export.info.preset,
        parameters=export.model.param_counts()["total"],
        shape=Shape(**shape),
        teacher_forced=TeacherForced.from_metrics(tf),
        reference=summary.reference,
        greedy=summary.greedy,
        sampled=summary.sampled,
        samples=summary.samples,
        attention=AttentionResult(**attention),
        nucleus=summary.nucleus,
        beam=summary.beam,
        confidence=summary.confidence,
        loss_by_position=positions,
        leaky=None if leaky is None else TeacherForced.from_metrics(leaky),
    )


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def write_outputs(
    run: RunDir, rep: Reporter, results: dict[str, ModelResult], context: Context, samples: int
) -> Path:
    """report.md, metrics.json, plots, TensorBoard events and result.json (main process)."""
    figures = plots.make_figures(results, samples)
    paths = plots.save_figures(figures, run.path)
    text = report.markdown(results, context, {k: f"{plots.PLOTS}/{p.name}" for k, p in paths.items()})
    (run.path / "report.md").write_text(text)
    models = {name: m.to_json() for name, m in results.items()}
    run.write("metrics.json", {"context": context.to_json(), "models": models})
    for name, m in results.items():  # one TensorBoard run per model, tb/<name>: one tag per quantity
        with SummaryWriter(str(run.path / "tb" / plots.safe_name(name))) as writer:
            plots.write_model_events(writer, m)
        run.log_metrics({"step": 0, "model": name, **plots.model_scalars(m)})
    for name, fig in figures.items():
        rep.image(f"report/{name}", fig, 0)
    if rep.writer is not None:
        rep.writer.add_text("report", text, 0)
    entries = {name: m.result_entry() for name, m in results.items()}
    run.write_result({"report": str(run.path / "report.md"), "models": entries})
    return run.path / "report.md"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(cfg: EvaluateConfig) -> dict[str, ModelResult]:
    if not cfg.models:
        raise UsageError(
            "no models to evaluate: pass --models EXPORT_DIR [EXPORT_DIR ...] (a run's best/ or last/, or the run folder)"
        )
    accelerator = accel.build_accelerator(cfg.precision, log_with="tensorboard")

    # Models, judge and data: one tokenizer and vocabulary map for all, checked before any work.
    exports = [checkpoint.load_export(path) for path in cfg.models]
    names, judge, judge_name, judge_rule = name_models(cfg, exports)
    models = dict(zip(names, exports))
    everyone = models | ({judge_name: judge} if judge is not None else {})
    data = open_data(cfg, exports, everyone)
    seq_len = compounding.check_window(cfg.seq_len, cfg.gap_horizon, models, everyone)
    prompts = compounding.sample_prompts(data.val, cfg.prompts, cfg.prompt_tokens, cfg.new_tokens, cfg.seed)
    if len(prompts) < accelerator.num_processes:
        raise UsageError(
            f"{len(prompts)} prompts cannot be shared by {accelerator.num_processes} processes; raise --prompts"
        )

    # The same windows for every model: teacher-forced metrics and attention.
    rank, world, vocab = accelerator.process_index, accelerator.num_processes, exports[0].vocab
    val = eval_batches(data.val, seq_len, cfg.eval_tokens, cfg.batch_size, rank, world, vocab)
    attention_x = eval_batches(
        data.val, seq_len, cfg.attention_windows * seq_len, cfg.attention_windows, vocab=vocab
    )[0][0]
    bench = Bench(data, prompts, val, attention_x, judge, judge_name)

    run = open_run(accelerator, cfg, names[0])
    context = make_context(cfg, bench, models, judge_rule, seq_len)
    stage.write_run_files(run, accelerator, to_dict(cfg) | {"resolved": context.to_json()})
    rep = start_reporting(accelerator, cfg, run, context)
    if judge is not None:
        judge.model.to(accelerator.device)
        honest(judge.model)

    results: dict[str, ModelResult] = {}
    tick = ticker(rep, [0])
    for name, export in models.items():
        result = evaluate_model(export, accelerator, bench, cfg, lambda phase, name=name: tick(name, phase))
        if result is not None:
            results[name] = result
            rep.print(report.one_line(name, result))

    path = None
    if accelerator.is_main_process:
        tick("", "writing report.md, plots and TensorBoard events")
        path = write_outputs(run, rep, results, context, cfg.samples)
        rep.progress(rep.bar.total)
        rep.end_progress()  # the summary below prints once, under the finished bar
        for line in report.summary_lines(results):
            rep.print(line)
        point_latest("evaluate", run.path)  # runs/latest/evaluate, when the run folder lies under runs/
    rep.print(f"report: {path}")
    rep.print(
        f"TensorBoard: tensorboard --logdir {run.path / 'tb'}  (one run per model: {', '.join(models)})"
    )
    rep.close()
    return results


if __name__ == "__main__":
    cli.run(main, cli.parse(EvaluateConfig, PRESETS))
