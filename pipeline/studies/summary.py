"""A teacher, its student and their evaluation in a few lines and one JSON file (the quickstart's summary).

Reads only the run folders' own files (result.json of pretrain and distill, metrics.json and
report.md of evaluate), so it summarises any such trio, wherever it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.run.folder import LATEST, runs_root

GAP_J = 8
"""The exposure-bias gap is quoted after this many of the model's own tokens (or the longest measured)."""


def _read(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{what}: {path} does not exist; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{what}: {path} is not valid JSON ({err}); {fix}") from err


def _model(run: Path, stage: str) -> dict[str, Any]:
    """A training run's figures: val loss and bits per byte at its best evaluation, its size, steps, time, export."""
    result = _read(
        run / "result.json", f"the {stage} run", f"finish it first (python recipes/{stage}.py --out {run})"
    )
    config = _read(run / "config.json", f"the {stage} run", "it is not a run folder of this project")
    export = run / "best" if (run / "best").is_dir() else run / "last"
    exported = _read(export / "config.json", f"the {stage} run's export", f"finish the run first ({run})")
    best = result.get("best_val_loss")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    at_best = next((m for m in metrics if m.get("step") == result.get("best_step") and "val_loss" in m), {})
    model = exported.get("model") or {}
    return {
        "run": str(run),
        "export": str(export),
        "preset": config.get("preset"),
        "shape": {k: model.get(k) for k in ("n_layers", "n_heads", "d_model", "max_seq_len")},
        "parameters": (result.get("parameters") or {}).get("total"),
        "steps": result.get("step"),
        "tokens": result.get("tokens"),
        "train_seconds": result.get("wall_time_s"),
        "val_loss": best,
        "val_bpb": at_best.get("val_bpb"),
        "val_agree_top1": at_best.get("val_agree_top1"),
        "val_kl": at_best.get("val_kl"),
        "init": (config.get("student") or {}).get("init"),
    }


def _gap_at(gap: dict[str, Any], j: int) -> dict[str, Any]:
    """The exposure-bias gap at j own tokens (the nearest measured j at or below it), with its two losses."""
    js = list(gap.get("j") or [])
    if not js:
        return {}
    i = max((n for n, v in enumerate(js) if v <= j), default=0)
    pick = {"j": js[i], "gap": gap["gap"][i]}
    for key in ("true_prefix_loss", "own_prefix_loss"):
        if gap.get(key) is not None:
            pick[key] = gap[key][i]
    return pick


def _compounding(entry: dict[str, Any]) -> dict[str, Any]:
    """The compounding-error figures of one model of an evaluation (greedy rollouts)."""
    survival = entry.get("survival_by_position") or []
    independent = entry.get("independence_prediction") or []
    # The longest run of right tokens that independent errors would still give >= 5% of the time.
    k = max(
        (n + 1 for n, p in enumerate(independent[: len(survival)]) if p >= 0.05),
        default=min(1, len(survival)),
    )
    judge = entry.get("judge") or {}
    return {
        "val_loss": entry.get("val_loss"),
        "val_tokens": entry.get("val_tokens"),
        "top1_acc": entry.get("top1_acc"),
        "teacher_forced_accuracy": entry.get("teacher_forced_accuracy"),
        "first_divergence_mean": entry.get("first_divergence_mean"),
        "half_life": entry.get("half_life"),
        "k": k,
        "survival_at_k": survival[k - 1] if k else None,
        "independent_at_k": independent[k - 1] if k and len(independent) >= k else None,
        "exposure_gap": _gap_at(entry.get("exposure_gap") or {}, GAP_J),
        "judge_agreement_rollout": judge.get("agreement_rollout"),
        "judge_agreement_data": judge.get("agreement_data"),
    }


def summarise(teacher: Path, student: Path, evaluate: Path) -> dict[str, Any]:
    """The summary record of a teacher run, a student run and the evaluate run that compared them."""
    metrics = _read(
        evaluate / "metrics.json",
        "the evaluate run",
        f"finish it first (python recipes/evaluate.py --out {evaluate})",
    )
    models = metrics.get("models") or {}
    by_export = {str(Path(m.get("path", "")).resolve()): name for name, m in models.items()}
    t, s = _model(teacher, "pretrain"), _model(student, "distill")
    names = [by_export.get(str(Path(x["export"]).resolve())) for x in (t, s)]
    if None in names:
        raise UsageError(
            f"{evaluate} did not evaluate {t['export'] if names[0] is None else s['export']}: "
            f"run python recipes/evaluate.py --models {t['export']} {s['export']} --out {evaluate} --overwrite"
        )
    context = metrics.get("context") or {}
    return {
        "teacher": t | {"name": names[0], "evaluate": _compounding(models[names[0]])},
        "student": s | {"name": names[1], "evaluate": _compounding(models[names[1]])},
        "evaluate": {
            "run": str(evaluate),
            "report": str(evaluate / "report.md"),
            "prompts": context.get("prompts"),
            "prompt_tokens": context.get("prompt_tokens"),
            "new_tokens": context.get("new_tokens"),
        },
        "tensorboard": f"tensorboard --logdir {Path(teacher).parent}",
        "latest": str(runs_root() / LATEST),
    }


def _minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def lines(summary: dict[str, Any]) -> list[str]:
    """What the quickstart prints at the end: the figures, where the results are, what to run next."""
    t, s = summary["teacher"], summary["student"]
    te, se = t["evaluate"], s["evaluate"]

    def shape(m: dict[str, Any]) -> str:
        sh = m["shape"]
        heads = "head" if sh["n_heads"] == 1 else "heads"
        layers = "layer" if sh["n_layers"] == 1 else "layers"
        return f"{sh['n_layers']} {layers} x {sh['n_heads']} {heads}, d_model {sh['d_model']}, {m['parameters'] / 1e6:.2f}M parameters"

    out = [
        f"teacher  ({shape(t)}): val loss {t['val_loss']:.4f}, {t['val_bpb']:.3f} bits per byte",
        f"student  ({shape(s)}): val loss {s['val_loss']:.4f} ({s['val_loss'] - t['val_loss']:+.4f} against the "
        f"teacher), {s['val_bpb']:.3f} bits per byte; picks the teacher's top-1 token {_pct(s['val_agree_top1'])} of the time",
    ]
    k = te["k"]
    if k:
        out.append(
            f"compounding errors: fed the true text, the teacher predicts the token after each prompt right "
            f"{_pct(te['teacher_forced_accuracy'])} of the time, so {k} right in a row would happen {_pct(te['independent_at_k'])} of the time if errors "
            f"were independent; its own greedy rollouts get the first {k} right {_pct(te['survival_at_k'])} of the "
            f"time (student: {_pct(se['survival_at_k'])}) and leave the true text after "
            f"{te['first_divergence_mean']:.2f} tokens on average (student: {se['first_divergence_mean']:.2f})"
        )
    if s["val_loss"] < t["val_loss"] and s.get("init") in ("copy", "best_head", "merged_heads"):
        out.append(
            f"the student ends below its teacher: it started from the teacher's weights (--student.init {s['init']}) "
            f"and trained {s['steps']:,} more steps on the same data, which a teacher of only {t['steps']:,} steps "
            "still had to learn; a teacher trained to convergence keeps its lead (README, distill)"
        )
    tg, sg = te["exposure_gap"], se["exposure_gap"]
    if tg and sg:
        out.append(
            f"exposure-bias gap after {tg['j']} of its own tokens: teacher {tg['gap']:+.3f}, student {sg['gap']:+.3f} "
            "nats/token (the extra loss on the true continuation when the context is the model's own text)"
        )
    out += [
        f"exports: {t['export']} (teacher), {s['export']} (student); newest run of each stage: {summary['latest']}/<stage>",
        f"report: {summary['evaluate']['report']}",
        f"TensorBoard: {summary['tensorboard']}",
    ]
    stages = summary.get("stages") or {}
    if stages:
        parts = ", ".join(
            f"{name} skipped (done before"
            + (f", in {_minutes(v['first_run_seconds'])}" if v.get("first_run_seconds") is not None else "")
            + ")"
            if v.get("skipped")
            else f"{name} {_minutes(v['seconds'])}"
            for name, v in stages.items()
        )
        out.append(f"time: {_minutes(summary['wall_seconds'])} ({parts})")
    return out


def stage_times(
    seconds: dict[str, float], skipped: set[str], previous: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Each stage's wall seconds: this invocation's, or, for a stage it skipped, the earlier summary's (when known)."""
    before = (previous or {}).get("stages") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, value in seconds.items():
        entry: dict[str, Any] = {"seconds": value, "skipped": name in skipped}
        if name in skipped and name in before:
            entry["first_run_seconds"] = before[name].get("first_run_seconds", before[name]["seconds"])
        out[name] = entry
    return out
