"""Comparisons of pretrain variants: NAME=FLAGS parsing and checks, run-folder reuse, the table, plots and HParams.

Each variant is a normal pretrain run folder <comparison>/<name>. Everything here reads those
folders (config.json, result.json, metrics.jsonl), never logs; the runs themselves are
`pipeline.studies.jobs.Job`s.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pipeline import cli
from pipeline.config import PretrainConfig
from pipeline.errors import ConfigError, UsageError
from pipeline.run.folder import read_metrics
from pipeline.train.stage import flat_config

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED = ("logs", "plots", "tb", "summary")
"""Names a variant cannot take: the comparison's own folders."""
OWNED_FLAGS = {  # flags the comparison sets in every variant, and the compare flag to use instead
    "--out": "--out",
    "--data": "--data",
    "--data.dir": "--data",
    "--data.corpus": "--data DIR, a folder from recipes/tokenize.py: every variant reads one data folder",
    "--data.encoding": "--data DIR, a folder from recipes/tokenize.py: every variant reads one data folder",
    "--preset": "--preset",
    "--max-steps": "--max-steps",
    "--train.max-steps": "--max-steps",
    "--train.max-tokens": "--max-steps",
    "--train.max-epochs": "--max-steps",
    "--train.seed": "--seed",
    "--train.resume": "(always auto)",
    "-h": "(no help inside a variant)",
    "--help": "(no help inside a variant)",
}
DIAGNOSTIC_PREFIXES = (
    "attention/", "heads/", "grad_rms/", "update_ratio/", "clipped_share", "train_clean_loss", "embedding/",
    "grad_rms_touched/", "weight_norm/", "grad_norm_layer/",
)  # fmt: skip
"""Scalars of the last evaluation record that summary.csv carries (columns: the union over variants)."""
HOW_IT_RUNS = frozenset(
    {"config", "train.progress", "train.threads", "train.dist_timeout", "train.keep_states", "train.resume"}
    | {"train.amend"}
)
"""Settings that change how a run runs, not what it computes: ignored when deciding to reuse a folder."""
RESULT_COLUMNS = (  # summary.csv column -> result.json key
    ("best_val_loss", "best_val_loss"),
    ("final_val_loss", "final_val_loss"),
    ("final_val_bpb", "final_val_bpb"),
    ("tokens_per_s", "tokens_per_s"),
    ("peak_mem_gib", "peak_mem_gib"),
    ("steps", "step"),
    ("tokens", "tokens"),
    ("wall_time_s", "wall_time_s"),
    ("initial_val_loss", "initial_val_loss"),
    ("ln_vocab", "ln_vocab"),
)
TABLE_COLUMNS = {  # summary.md column -> header
    "variant": "variant",
    "flags": "flags",
    "parameters": "parameters",
    "initial_val_loss": "initial val loss",
    "best_val_loss": "best val loss",
    "final_val_loss": "final val loss",
    "final_val_bpb": "bits/byte",
    "tokens_per_s": "tokens/s",
    "peak_mem_gib": "peak GiB",
    "steps": "steps",
    "wall_time_s": "wall s",
}
HPARAM_METRICS = (
    "best_val_loss", "final_val_loss", "final_val_bpb", "parameters", "tokens_per_s", "peak_mem_gib",
    "wall_time_s", "initial_val_loss",
)  # fmt: skip


@dataclass
class Variant:
    """One variant: its name (the run folder's), its flags as typed, and those flags split like a shell line."""

    name: str
    flags: str
    args: list[str]


def parse_variants(specs: Sequence[str]) -> list[Variant]:
    """--variants NAME=FLAGS ... as Variants; UsageError naming the fix for bad syntax or names."""
    if not specs:
        raise UsageError(
            "--variants is empty: give at least one, e.g. --variants 'h4=' 'h8=--model.n-heads 8'"
        )
    variants: list[Variant] = []
    for spec in specs:
        name, eq, flags = spec.partition("=")
        if not eq:
            raise UsageError(
                f"--variants '{spec}' has no '=': write NAME=FLAGS, e.g. 'h8=--model.n-heads 8' "
                f"(or '{spec}=' for the preset unchanged)"
            )
        name = name.strip()
        if not NAME.fullmatch(name) or name in RESERVED:
            why = (
                f"is reserved for the comparison's own {name}/"
                if name in RESERVED
                else "is unsafe as a folder name"
            )
            raise UsageError(
                f"--variants '{spec}': the name '{name}' {why}; use letters, digits, '-' and '_' "
                f"(at most 64, starting with a letter or digit), not {', '.join(RESERVED)}"
            )
        if any(v.name == name for v in variants):
            raise UsageError(f"--variants names '{name}' twice: give every variant its own name")
        try:
            args = shlex.split(flags)
        except ValueError as err:
            raise UsageError(
                f"--variants {name}: cannot split '{flags}' like a shell line ({err}); fix its quotes"
            ) from None
        variants.append(Variant(name, flags.strip(), args))
    for variant in variants:
        check_owned_flags(variant)
    return variants


def check_owned_flags(variant: Variant) -> None:
    """UsageError when a variant sets a flag the comparison sets for every variant."""
    for arg in variant.args:
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in OWNED_FLAGS:
            raise UsageError(
                f"--variants {variant.name}: must not set {flag}, which the comparison sets for every variant "
                f"(use {OWNED_FLAGS[flag]})"
            )


def resolve(
    variant: Variant, argv: Sequence[str], presets: Mapping[str, Callable[[], PretrainConfig]]
) -> PretrainConfig:
    """The variant's pretrain config from its full argv, parsed in-process; UsageError naming the variant.

    recipes/pretrain.py would parse the same argv the same way, so a bad flag in any variant is
    found here, before anything runs.
    """
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            return cli.parse(PretrainConfig, presets, list(argv), prog="recipes/pretrain.py")
    except (SystemExit, ConfigError, UsageError) as err:
        why = _condense(said.getvalue()) or str(err)
        raise UsageError(
            f"--variants {variant.name}: bad flags '{variant.flags}': {why}; fix that variant "
            f"(python recipes/pretrain.py --help lists the flags); nothing was run"
        ) from None


def _condense(text: str, limit: int = 600) -> str:
    """tyro's boxed error message as one line."""
    lines = [line.strip().strip("│╭╮╰╯").strip() for line in text.splitlines()]
    kept = [
        line.removeprefix("error: ")
        for line in lines
        if line.strip("-─") and not line.startswith("For full helptext")
    ]
    message = " ".join(" ".join(kept).split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def config_changes(now: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} for the settings of `now` (a parsed config) that a run's config.json differs in.

    The run resolves some settings against the data (vocab_size 0, the encoding of --data) and
    records paths as given; those compare as resolved. How a run runs (HOW_IT_RUNS) is ignored.
    """
    now, saved = flat_config(now), flat_config(saved)
    changes = {}
    for key, value in now.items():
        old = saved.get(key, "(missing)")
        if key in HOW_IT_RUNS or (key == "model.vocab_size" and not value):
            continue
        if key == "data.encoding" and now.get("data.dir"):
            continue
        if key in ("out", "data.dir") and isinstance(old, str) and value and old:
            same = Path(old).resolve() == Path(value).resolve()
        else:
            same = old == value
        if not same:
            changes[key] = (old, value)
    return changes


def folder_state(variant: Variant, run_dir: Path, config: Mapping[str, Any]) -> str:
    """'new', 'resume' or 'done' for a variant's run folder; UsageError for one holding anything else.

    A folder is only ever reused or resumed when its config.json matches the variant's config:
    a run with other settings is refused, never overwritten.
    """
    saved = run_dir / "config.json"
    if not saved.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise UsageError(
                f"--variants {variant.name}: {run_dir} holds files but no run (no config.json); "
                f"choose another --out, or remove {run_dir}"
            )
        return "new"
    changes = config_changes(config, json.loads(saved.read_text()))
    if changes:
        listing = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in list(changes.items())[:4])
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        raise UsageError(
            f"--variants {variant.name}: {run_dir} holds a run made with other settings ({listing}{more}); "
            f"it is never overwritten: choose another --out, or remove {run_dir} to redo that variant"
        )
    return "done" if (run_dir / "result.json").is_file() else "resume"


# --------------------------------------------------------------------------------------------------
# The summary: rows, curves, the table
# --------------------------------------------------------------------------------------------------


@dataclass
class Curves:
    """A run's curves from metrics.jsonl: (step, val loss) at evaluations, (step, train loss) at logs."""

    val_steps: list[int]
    val_loss: list[float]
    train_steps: list[int]
    train_loss: list[float]


def by_step(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records merged per step, in step order (a step logged twice keeps its last values)."""
    merged: dict[int, dict[str, Any]] = {}
    for record in read_metrics(run_dir):
        merged.setdefault(int(record["step"]), {}).update(record)
    return [merged[s] for s in sorted(merged)]


def read_curves(records: Sequence[Mapping[str, Any]]) -> Curves:
    val = [r for r in records if r.get("val_loss") is not None]
    train = [r for r in records if r.get("loss") is not None]
    return Curves(
        [int(r["step"]) for r in val], [float(r["val_loss"]) for r in val],
        [int(r["step"]) for r in train], [float(r["loss"]) for r in train],
    )  # fmt: skip


def diagnostics(records: Sequence[Mapping[str, Any]], tb_dir: Path | None = None) -> dict[str, float]:
    """The DIAGNOSTIC_PREFIXES scalars of the last evaluation, sorted by name.

    From its metrics.jsonl record; with `tb_dir`, also those the run wrote to TensorBoard only
    (the per-head probes log there) at that step. The record wins where both hold a key.
    """
    evals = [r for r in records if r.get("val_loss") is not None]
    if not evals:
        return {}
    last = evals[-1]
    found = {
        k: v
        for k, v in last.items()
        if k.startswith(DIAGNOSTIC_PREFIXES) and isinstance(v, int | float) and not isinstance(v, bool)
    }
    if tb_dir is not None:
        found = tensorboard_scalars(tb_dir, int(last["step"])) | found
    return dict(sorted(found.items()))


def tensorboard_scalars(tb_dir: Path, step: int) -> dict[str, float]:
    """The scalars under DIAGNOSTIC_PREFIXES (tags with a '/', named as in metrics.jsonl) in tb_dir's events at `step`."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keep_few = {"images": 1, "histograms": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, **keep_few})
    events.Reload()
    found = {}
    for tag in events.Tags().get("scalars", []):
        if "/" in tag and tag.startswith(DIAGNOSTIC_PREFIXES):
            at = [e.value for e in events.Scalars(tag) if e.step == step]
            if at:
                found[tag] = float(at[-1])
    return found


def read_row(variant: Variant, run_dir: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary.csv's row of a finished variant: result.json's figures, then the last evaluation's diagnostics."""
    result = json.loads((run_dir / "result.json").read_text())
    row: dict[str, Any] = {
        "variant": variant.name,
        "flags": variant.flags,
        "parameters": (result.get("parameters") or {}).get("total"),
    }
    row |= {column: result.get(key) for column, key in RESULT_COLUMNS}
    return row | diagnostics(records, run_dir / "tb")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS.values()) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [_fmt(row.get(k)) for k in TABLE_COLUMNS]
        cells[1] = f"`{cells[1]}`" if row.get("flags") else "(preset)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


# --------------------------------------------------------------------------------------------------
# Plots and TensorBoard
# --------------------------------------------------------------------------------------------------


def plot_overlay(names: Sequence[str], curves: Sequence[Curves], which: str) -> Figure:
    """Val ('val') or train ('train') loss against steps, one line per variant."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, c in zip(names, curves):
        steps, loss = (c.val_steps, c.val_loss) if which == "val" else (c.train_steps, c.train_loss)
        ax.plot(steps, loss, marker="." if which == "val" else None, label=name)
    title = "Val loss" if which == "val" else "Train loss (logged steps)"
    ax.set(xlabel="optimizer step", ylabel=f"{which} loss (nats/token)", title=f"{title} per variant")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def plot_best(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Best val loss per variant as bars, each labelled with its value."""
    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    values = [r["best_val_loss"] if r.get("best_val_loss") is not None else math.nan for r in rows]
    bars = ax.bar([r["variant"] for r in rows], values, color="C0")
    ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize="small")
    ax.set(ylabel="best val loss (nats/token)", title="Best val loss per variant")
    ax.grid(alpha=0.3, axis="y")
    return fig


def flag_keys(variants: Sequence[Variant], configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted config keys any variant's flags set (--model.n-heads -> model.n_heads), in order."""
    keys: list[str] = []
    for variant, config in zip(variants, configs):
        known = flat_config(config)
        for arg in variant.args:
            if not arg.startswith("--"):
                continue
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            head, _, last = key.rpartition(".")
            if key not in known and last.startswith("no_"):  # --model.no-bias sets model.bias
                key = f"{head}.{last[3:]}" if head else last[3:]
            if key in known and key not in keys:
                keys.append(key)
    return keys


def hparams(variant: Variant, config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The HParams of one variant: its name and its value of every key some variant's flags set."""
    known = flat_config(config)
    out: dict[str, Any] = {"variant": variant.name}
    for key in keys:
        value = known.get(key)
        out[key] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return out


def write_tensorboard(
    log_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[dict[str, Any]],
    figures: dict[str, Figure],
) -> None:
    """One HParams run per variant under log_dir/<variant>, and the figures under log_dir/summary.

    The runs' own tb/ folders stay in their run folders: `tensorboard --logdir <comparison>`
    shows their curves overlaid and this HParams view together.
    """
    from torch.utils.tensorboard import SummaryWriter

    for row, hp in zip(rows, params):
        metrics = {
            f"compare/{k}": float(row[k])
            for k in HPARAM_METRICS
            if isinstance(row.get(k), int | float) and math.isfinite(row[k])
        }
        with SummaryWriter(str(log_dir / row["variant"])) as writer:
            writer.add_hparams(hp, metrics, run_name=".")
    with SummaryWriter(str(log_dir / "summary")) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"compare/{name}", fig, 0)
