"""Batch-size scaling study: one real training run per global batch size, then a table and plots.

    python recipes/scaling.py --preset shakespeare --batch-sizes 8 16 32 64 128 --max-tokens 2000000
    python recipes/scaling.py --preset tiny --data DIR --out DIR --batch-sizes 8 16 32 --max-steps 40   # CPU, a minute
    python recipes/scaling.py --preset char --batch-sizes 12 24 48 96 --max-tokens 1000000 --lr-rule linear --target-loss 1.7
    python recipes/scaling.py --stage distill --teacher runs/pretrain/X/best --preset one_head \
        --batch-sizes 8 16 32 --max-tokens 500000                                  # a student preset (recipes/distill.py)
    python recipes/scaling.py --preset shakespeare --batch-sizes 32 64 128 256 --max-tokens 4000000 \
        --launch-config launch/gpu.yaml --parallel 4 --gpu-ids 0 1 2 3            # four runs at once, a GPU each

Every run is `python recipes/<stage>.py --preset P --out <study>/bs<B> ...` (or `accelerate launch
--config_file FILE ...`) with the same --train.seed, so all start from the same weights and read
the windows in the same order (pipeline/data/shards.py: a batch of B takes the next B windows of one
seeded order). Per batch size the study sets micro-batch and accumulation, the learning rate
(--lr-rule none|linear|sqrt from --base-lr at --reference-batch-size, min_lr scaled alike), the
warmup (the same tokens, or steps) and evaluations at the same fractions of the budget; with
--noise-scale each run that accumulates gradients estimates B_simple (pipeline/train/noise_scale.py).
Stopping the study (Ctrl-C, SIGTERM) stops its runs; running the same command again skips
finished runs (their result.json exists) and resumes the others from their last evaluation.
--run-args='--model.dropout 0 --train.precision bf16' passes further flags to every run (with
`=`, since the value starts with dashes).

Writes to the study folder: config.json (settings and each run's flags), bs<B>/ (run folders),
logs/bs<B>.log, summary.csv, summary.md, result.json (rows, target, critical batch size),
val_loss_vs_tokens.png, steps_to_target.png, wall_time.png, and tb/ (`tensorboard --logdir
<study>/tb`: one HParams view of all runs, val loss against tokens, the plots).
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import datetime as dt
import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline import cli
from pipeline.cli import to_dict
from pipeline.config import PretrainConfig, TokenizeConfig
from pipeline.data import tokenize
from pipeline.data.shards import TokenData
from pipeline.distill.config import DistillConfig
from pipeline.distill.teacher import check_teacher_corpus, distill_data, with_teacher_windows
from pipeline.errors import ConfigError, UsageError, closest
from pipeline.files import write_json
from pipeline.run.folder import runs_root
from pipeline.studies import scaling
from pipeline.studies.config import ScalingConfig
from pipeline.studies.jobs import Job, RunFailed, run_jobs
from pipeline.train.batching import split_batch, steps_for_tokens
from students import PRESETS as STUDENTS
from teachers import PRESETS as TEACHERS

RECIPES = Path(__file__).resolve().parent
PORT_BASE = 29600  # parallel multi-process runs each need their own rendezvous port
STUDY_FLAGS = {  # flags the study sets in every run, and the study flag to use instead
    "--out": "--out",
    "--data": "--data",
    "--data.dir": "--data",
    "--preset": "--preset",
    "--teacher": "--teacher",
    "--train.micro-batch-size": "--micro-batch-size",
    "--train.grad-accum-steps": "--batch-sizes",
    "--max-steps": "--max-steps",
    "--train.max-steps": "--max-steps",
    "--train.max-tokens": "--max-tokens",
    "--train.max-epochs": "--max-tokens",
    "--optim.lr": "--base-lr",
    "--optim.min-lr": "--base-lr",
    "--optim.warmup-steps": "--warmup",
    "--train.seed": "--seed",
    "--train.eval-interval": "--evals",
    "--train.resume": "(always auto)",
    "--train.noise-scale": "--noise-scale",
    "--train.no-noise-scale": "--noise-scale",
    "--train.early-stop-patience": "(always 0: every run trains its whole budget)",
}


def stage_config(cfg: ScalingConfig) -> Any:
    """The stage's resolved configuration for the preset and --run-args (checks them before any run)."""
    if cfg.stage == "pretrain":
        cls, presets = PretrainConfig, TEACHERS
    else:
        cls, presets = DistillConfig, STUDENTS
    if cfg.preset not in presets:
        raise UsageError(
            f"--stage {cfg.stage} has no preset '{cfg.preset}'{closest(cfg.preset, list(presets))}; "
            f"choose one of: {', '.join(presets)}"
        )
    extra = shlex.split(cfg.run_args)
    for arg in extra:
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in STUDY_FLAGS:
            raise UsageError(
                f"--run-args must not set {flag}: the study sets it per run (use {STUDY_FLAGS[flag]})"
            )
    teacher = ["--teacher", cfg.teacher] if cfg.stage == "distill" else []
    stage_cfg = cli.parse(
        cls, presets, ["--preset", cfg.preset, *teacher, *extra], prog=f"recipes/{cfg.stage}.py"
    )
    # A student preset's windows and batch left at 0 are the teacher's: resolved here as distill would.
    return with_teacher_windows(stage_cfg, cfg.teacher) if cfg.stage == "distill" else stage_cfg


def launch_world_size(launch_config: str) -> int:
    """Processes per run: the launch YAML's num_processes (1 without one)."""
    if not launch_config:
        return 1
    path = Path(launch_config)
    if not path.is_file():
        raise UsageError(
            f"--launch-config {path} does not exist; pass a YAML from launch/, e.g. launch/gpu.yaml"
        )
    settings = yaml.safe_load(path.read_text()) or {}
    return int(settings.get("num_processes", 1)) * int(settings.get("num_machines", 1))


def data_dir(cfg: ScalingConfig, stage_cfg: Any) -> str:
    """The data folder every run reads; the preset's default one is tokenized here first (not in N runs)."""
    if cfg.data or stage_cfg.data.dir:
        return cfg.data or stage_cfg.data.dir
    data = stage_cfg.data
    if cfg.stage == "distill":  # the teacher's folder, or a corpus in the teacher's tokenizer
        data = distill_data(data, cfg.teacher)
        if data.dir:
            return data.dir
    tok = TokenizeConfig(input=data.corpus, encoding=data.encoding)
    out = tokenize.prepare_default(tok, log=lambda line: print(line, flush=True), progress=cfg.progress)
    if cfg.stage == "distill" and not stage_cfg.data.corpus:  # the teacher's corpus, as we chose it
        check_teacher_corpus(cfg.teacher, TokenData.open(out))
    return str(out)


def plan_run(cfg: ScalingConfig, stage_cfg: Any, batch: int, world: int, data: str) -> tuple[list[str], int]:
    """One run's flags for batch size `batch` (sequences), and its number of optimizer steps."""
    train, optim = stage_cfg.train, stage_cfg.optim
    reference = cfg.reference_batch_size or train.micro_batch_size * train.grad_accum_steps
    base_lr = cfg.base_lr or optim.lr
    lr = scaling.scaled_lr(base_lr, batch, reference, cfg.lr_rule)
    min_lr = lr * optim.min_lr / optim.lr
    warmup = optim.warmup_steps
    if cfg.warmup == "tokens" and warmup:
        warmup = max(1, round(warmup * reference / batch))
    micro, accum = split_batch(batch, cfg.micro_batch_size or train.micro_batch_size, world)
    steps = cfg.max_steps or steps_for_tokens(cfg.max_tokens, batch * stage_cfg.data.seq_len)
    eval_interval = max(1, steps // cfg.evals)
    budget = ["--train.max-steps", str(cfg.max_steps), "--train.max-tokens", str(cfg.max_tokens)]
    defaults = [  # the study's choices that --run-args may change: they come first, so its flags win
        *["--train.log-interval", str(max(1, min(train.log_interval, eval_interval)))],
        *["--train.keep-states", "1", "--train.no-progress"],
    ]
    args = [
        *defaults,
        *shlex.split(cfg.run_args),
        *(["--teacher", cfg.teacher] if cfg.stage == "distill" else []),
        *(["--data", data] if data else []),
        *["--preset", cfg.preset, *budget, "--train.max-epochs", "0"],
        *["--train.micro-batch-size", str(micro), "--train.grad-accum-steps", str(accum)],
        *["--optim.lr", f"{lr:.6g}", "--optim.min-lr", f"{min_lr:.6g}", "--optim.warmup-steps", str(warmup)],
        *["--train.seed", str(cfg.seed), "--train.eval-interval", str(eval_interval)],
        *["--train.early-stop-patience", "0", "--train.resume", "auto"],
        *(["--train.noise-scale"] if cfg.noise_scale else []),
    ]
    return args, steps


def check_study(out: Path, jobs: list[Job]) -> dict[str, list[str]]:
    """Refuse to mix runs made with other flags into this study; returns every run's flags."""
    recorded = (
        json.loads((out / "config.json").read_text()).get("runs", {})
        if (out / "config.json").is_file()
        else {}
    )
    for job in jobs:
        started = (job.out / "config.json").is_file()
        before = recorded.get(job.name)
        if started and before != job.args:
            why = "was started by something else" if before is None else "was made with other flags"
            raise UsageError(
                f"{job.out} {why} than this study would use ({' '.join(job.args)}); "
                f"choose another --out, or remove that run folder to redo it"
            )
    return recorded | {job.name: job.args for job in jobs}


def launcher(cfg: ScalingConfig, world: int):
    """command(job, slot): python recipes/<stage>.py, or accelerate launch with this slot's devices."""
    recipe = str(RECIPES / f"{cfg.stage}.py")

    def command(job: Job, slot: int) -> list[str]:
        if not cfg.launch_config and not cfg.gpu_ids:
            return [sys.executable, recipe, *job.args]
        argv = [sys.executable, "-m", "accelerate.commands.launch"]
        argv += ["--config_file", cfg.launch_config] if cfg.launch_config else []
        argv += ["--gpu_ids", cfg.gpu_ids[slot]] if cfg.gpu_ids else []
        argv += ["--main_process_port", str(PORT_BASE + slot)] if cfg.parallel > 1 and world > 1 else []
        return [*argv, recipe, *job.args]

    return command


def summarise(out: Path, cfg: ScalingConfig, jobs: list[Job], batches: list[int]) -> dict[str, Any]:
    """Table (CSV, Markdown), plots (PNG), TensorBoard and result.json from the run folders."""
    curves = [scaling.read_curve(job.out) for job in jobs]
    rows = [scaling.run_row(job.out, b, curve) for job, b, curve in zip(jobs, batches, curves)]
    target = cfg.target_loss or scaling.default_target(curves)
    scaling.add_targets(rows, curves, target)
    crit = scaling.critical_batch(rows)
    scaling.write_csv(rows, out / "summary.csv")
    table = scaling.markdown_table(rows)
    notes = critical_notes(crit, target, rows)
    (out / "summary.md").write_text(f"# Batch-size study: {cfg.stage} `{cfg.preset}`\n\n{table}\n\n{notes}\n")
    figures = {
        "val_loss_vs_tokens": scaling.plot_loss_curves(rows, curves, target),
        "steps_to_target": scaling.plot_steps_to_target(rows, crit),
        "wall_time": scaling.plot_wall_time(rows),
    }
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120)
    scaling.write_tensorboard(out / "tb", rows, curves, figures)
    result = {"target_loss": target, "critical_batch": crit, "rows": rows}
    write_json(out / "result.json", result)
    print(f"\n{table}\n\n{notes}")
    return result


def critical_notes(crit: dict[str, float | None], target: float, rows: list[dict[str, Any]]) -> str:
    missed = [str(r["batch_size"]) for r in rows if r["steps_to_target"] is None]
    lines = [
        f"Target val loss: {target:.4f}" + (f" (not reached by B = {', '.join(missed)})" if missed else "")
    ]
    if crit["b_simple"]:
        lines.append(
            f"Gradient noise scale B_simple (median over runs, at the target): {crit['b_simple']:,.1f} sequences"
        )
    else:
        lines.append("B_simple: not measured (runs need --noise-scale and gradient accumulation)")
    if crit["b_crit_fit"]:
        lines.append(
            f"Critical batch size from S = S_min (1 + B_crit / B): {crit['b_crit_fit']:,.1f} sequences "
            f"(S_min = {crit['s_min_fit']:,.0f} steps)"
        )
    else:
        lines.append(
            "Critical batch size fit: undefined (needs two batch sizes that reach the target, off perfect scaling)"
        )
    return "\n\n".join(lines)


def main(cfg: ScalingConfig) -> dict[str, Any]:
    if not (cfg.max_steps or cfg.max_tokens):
        raise ConfigError("no budget: set --max-steps N or --max-tokens T (the same for every run)")
    stage_cfg = stage_config(cfg)
    world = launch_world_size(cfg.launch_config)
    data = data_dir(cfg, stage_cfg)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out) if cfg.out else runs_root() / "scaling" / f"{cfg.preset}-{stamp}"
    batches = list(cfg.batch_sizes)
    jobs = []
    for batch in batches:
        args, steps = plan_run(cfg, stage_cfg, batch, world, data)
        name = f"bs{batch}"
        jobs.append(Job(name, out / name, [*args, "--out", str(out / name)], steps))

    out.mkdir(parents=True, exist_ok=True)
    runs = check_study(out, jobs)
    write_json(out / "config.json", to_dict(cfg) | {"runs": runs})
    todo = []
    for job in jobs:
        if job.done:
            print(f"{job.name}: finished earlier ({job.out / 'result.json'}): skipped", flush=True)
        else:
            state = "resuming" if (job.out / "config.json").is_file() else "to run"
            print(f"{job.name}: {state}, {job.total_steps:,} steps: {' '.join(job.args)}", flush=True)
            todo.append(job)
    print(
        f"study folder: {out}; {len(todo)} of {len(jobs)} runs to train, {cfg.parallel} at a time", flush=True
    )
    try:
        run_jobs(todo, launcher(cfg, world), cfg.parallel, out / "logs", cfg.progress)
    except RunFailed as err:
        cli.fail(f"{err}\nfix the cause and run the same command again: finished runs are kept", status=1)
    result = summarise(out, cfg, jobs, batches)
    print(
        f"wrote {out / 'summary.csv'}, {out / 'summary.md'} and the plots; tensorboard --logdir {out / 'tb'}"
    )
    return result


def all_presets() -> dict[str, Any]:
    """Names --preset accepts: teacher presets and student presets."""
    return dict.fromkeys([*TEACHERS, *STUDENTS], ScalingConfig)


if __name__ == "__main__":
    cli.run(main, cli.parse(ScalingConfig, all_presets()))
