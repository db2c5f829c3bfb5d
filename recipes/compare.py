"""Compare pretrain variants: one run per NAME=FLAGS, the same preset, data, seed and steps, then one table.

    python recipes/compare.py --preset NAME --data DIR --out DIR --max-steps N --variants 'NAME=FLAGS' ...
    python recipes/compare.py --preset tiny --data DIR --out runs/compare/heads --max-steps 200 \
        --variants 'h4=--model.n-heads 4' 'h8=--model.n-heads 8'           # CPU: a few-thousand-parameter model
    python recipes/compare.py --preset seed --max-steps 300 --out runs/compare/layers \
        --variants 'l1=' 'l2=--model.n-layers 2'                           # the sheet's model, 1 vs 2 layers
    python recipes/compare.py --preset shakespeare --max-steps 2000 --out runs/compare/pos \
        --variants 'rope=' 'learned=--model.positions learned' --dry-run   # print the commands only

Heads 4 against 8 on the tiny preset, from the start (Tiny Shakespeare in characters):

    python recipes/tokenize.py --input tinyshakespeare --encoding char --out data/shakespeare-char
    python recipes/compare.py --preset tiny --data data/shakespeare-char --out runs/compare/heads \
        --max-steps 200 --variants 'h4=--model.n-heads 4' 'h8=--model.n-heads 8'
    tensorboard --logdir runs/compare/heads     # HParams tab: one row per variant; Scalars: curves overlaid

Every variant is `python recipes/pretrain.py --preset P --data D <FLAGS> --out OUT/NAME
--train.max-steps N --train.seed S --train.resume auto` (or `accelerate launch --config_file FILE ...`):
a normal pretrain run folder. Every variant's flags are parsed as pretrain would parse them before
anything runs: a bad flag fails at once (exit 2) naming the variant. Running the same command again
reuses finished variants (result.json present, config.json matching the variant's settings) and
resumes unfinished ones; a folder holding a run with other settings is refused, never overwritten.
A variant's own --train.eval-interval, --train.early-stop-patience etc. win over the comparison's.

Writes to OUT: config.json (settings and each variant's command), NAME/ (run folders),
logs/NAME.log, summary.csv (one row per variant: parameters, best and final val loss, bits per
byte, tokens/s, peak memory, steps, tokens, wall time, initial val loss, and the attention/,
heads/, grad_rms/, update_ratio/, weight_norm/, embedding/, clipped_share and train_clean_loss
scalars of the last evaluation: from metrics.jsonl, or the run's tb/ for the probes' scalars),
summary.md, result.json (the rows), plots/val_loss.png, plots/train_loss.png,
plots/best_val_loss.png, and tb/ (one HParams run per variant, the plots under tb/summary).
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import datetime as dt
import shlex
from pathlib import Path
from typing import Any

from pipeline import cli
from pipeline.cli import to_dict
from pipeline.config import PretrainConfig, TokenizeConfig
from pipeline.data import tokenize
from pipeline.errors import ConfigError, UsageError
from pipeline.files import write_json
from pipeline.run.folder import runs_root
from pipeline.studies import compare
from pipeline.studies.config import CompareConfig
from pipeline.studies.jobs import Job, RunFailed, run_jobs
from pipeline.studies.scaling import write_csv
from teachers import PRESETS

PRETRAIN = Path(__file__).resolve().parent / "pretrain.py"
PORT_BASE = 29700  # parallel multi-process runs each need their own rendezvous port


def data_dir(cfg: CompareConfig, base: PretrainConfig) -> tuple[str, TokenizeConfig | None]:
    """The data folder every variant reads, and the tokenization to run first when it is missing."""
    if cfg.data:
        if not (Path(cfg.data) / tokenize.META).is_file():
            raise UsageError(
                f"--data {cfg.data} holds no {tokenize.META}: pass a folder made by recipes/tokenize.py "
                f"(or leave --data out for the preset's default data)"
            )
        return cfg.data, None
    if base.data.dir:
        return base.data.dir, None
    tok = TokenizeConfig(input=base.data.corpus, encoding=base.data.encoding)
    out = tokenize.default_out(tok)
    if (out / tokenize.META).is_file():
        tokenize.check_reuse(tok, out)  # before any run: the folder holds this corpus's text
        return str(out), None
    return str(out), tok


def variant_argv(
    cfg: CompareConfig, base: PretrainConfig, variant: compare.Variant, data: str, out: Path
) -> list[str]:
    """A variant's pretrain flags: the comparison's defaults, the variant's flags, then the settings every variant shares."""
    eval_interval = max(1, cfg.max_steps // cfg.evals)
    defaults = [
        *["--train.eval-interval", str(eval_interval)],
        *["--train.log-interval", str(max(1, min(base.train.log_interval, eval_interval)))],
        *["--train.early-stop-patience", "0", "--train.keep-states", "1", "--train.no-progress"],
    ]
    shared = [
        *["--preset", cfg.preset, "--data", data, "--out", str(out / variant.name)],
        *["--train.max-steps", str(cfg.max_steps), "--train.max-tokens", "0", "--train.max-epochs", "0"],
        *["--train.seed", str(cfg.seed), "--train.resume", "auto"],
    ]
    return [*defaults, *shlex.split(cfg.run_args), *variant.args, *shared]


def launcher(cfg: CompareConfig):
    """command(job, slot): python recipes/pretrain.py, or accelerate launch with the launch YAML."""

    def command(job: Job, slot: int) -> list[str]:
        if not cfg.launch_config:
            return [sys.executable, str(PRETRAIN), *job.args]
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.launch_config]
        argv += ["--main_process_port", str(PORT_BASE + slot)] if cfg.parallel > 1 else []
        return [*argv, str(PRETRAIN), *job.args]

    return command


def plan(
    cfg: CompareConfig, base: PretrainConfig, out: Path, data: str
) -> tuple[list[compare.Variant], list[Job], list[dict[str, Any]]]:
    """The variants, their jobs and their resolved configs; every variant's flags checked before any run."""
    if cfg.launch_config and not Path(cfg.launch_config).is_file():
        raise UsageError(f"--launch-config {cfg.launch_config} does not exist; pass a YAML from launch/")
    variants = compare.parse_variants(cfg.variants)
    compare.check_owned_flags(compare.Variant("--run-args", cfg.run_args, shlex.split(cfg.run_args)))
    jobs, configs = [], []
    for variant in variants:
        args = variant_argv(cfg, base, variant, data, out)
        configs.append(to_dict(compare.resolve(variant, args, PRESETS)))
        jobs.append(Job(variant.name, out / variant.name, args, cfg.max_steps))
    return variants, jobs, configs


def summarise(
    out: Path, cfg: CompareConfig, variants: list[compare.Variant], configs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """summary.csv, summary.md, result.json, plots/ and tb/ from the variants' run folders."""
    records = [compare.by_step(out / v.name) for v in variants]
    rows = [compare.read_row(v, out / v.name, r) for v, r in zip(variants, records)]
    curves = [compare.read_curves(r) for r in records]
    write_csv(rows, out / "summary.csv")
    table = compare.markdown_table(rows)
    head = f"# Comparison: `{cfg.preset}`, {cfg.max_steps:,} steps, seed {cfg.seed}"
    (out / "summary.md").write_text(
        f"{head}\n\n{table}\n\nAll columns: summary.csv. Curves: plots/, `tensorboard --logdir {out}`.\n"
    )
    names = [v.name for v in variants]
    figures = {
        "val_loss": compare.plot_overlay(names, curves, "val"),
        "train_loss": compare.plot_overlay(names, curves, "train"),
        "best_val_loss": compare.plot_best(rows),
    }
    (out / "plots").mkdir(exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(out / "plots" / f"{name}.png", dpi=120)
    keys = compare.flag_keys(variants, configs)
    params = [compare.hparams(v, c, keys) for v, c in zip(variants, configs)]
    compare.write_tensorboard(out / "tb", rows, params, figures)
    write_json(out / "result.json", {"rows": rows})
    print(f"\n{table}")
    return rows


def main(cfg: CompareConfig) -> list[dict[str, Any]]:
    if not cfg.max_steps:
        raise ConfigError("no budget: set --max-steps N (the same optimizer steps for every variant)")
    base = PRESETS[cfg.preset]()
    data, to_tokenize = data_dir(cfg, base)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out) if cfg.out else runs_root() / "compare" / f"{cfg.preset}-{stamp}"
    variants, jobs, configs = plan(cfg, base, out, data)
    if cfg.dry_run:
        command = launcher(cfg)
        for job in jobs:
            print(f"{job.name}: {shlex.join(command(job, 0))}")
        return []
    states = [compare.folder_state(v, job.out, c) for v, job, c in zip(variants, jobs, configs)]
    if to_tokenize is not None:
        tokenize.prepare_default(to_tokenize, log=lambda line: print(line, flush=True), progress=cfg.progress)
    out.mkdir(parents=True, exist_ok=True)
    commands = {v.name: {"flags": v.flags, "args": job.args} for v, job in zip(variants, jobs)}
    write_json(out / "config.json", to_dict(cfg) | {"runs": commands})
    todo = []
    for job, state in zip(jobs, states):
        if state == "done":
            print(f"{job.name}: finished earlier ({job.out / 'result.json'}): reused", flush=True)
            continue
        print(
            f"{job.name}: {'resuming' if state == 'resume' else 'to run'}: {shlex.join(job.args)}", flush=True
        )
        todo.append(job)
    print(
        f"comparison folder: {out}; {len(todo)} of {len(jobs)} variants to train, {cfg.parallel} at a time",
        flush=True,
    )
    try:
        run_jobs(todo, launcher(cfg), cfg.parallel, out / "logs", cfg.progress)
    except RunFailed as err:
        cli.fail(f"{err}\nfix the cause and run the same command again: finished variants are kept", status=1)
    rows = summarise(out, cfg, variants, configs)
    print(f"wrote {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'plots'}; tensorboard --logdir {out}")
    return rows


if __name__ == "__main__":
    cli.run(main, cli.parse(CompareConfig, dict.fromkeys(PRESETS, CompareConfig)))
