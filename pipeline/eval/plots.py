"""The evaluation's figures as PNGs, and its numbers and curves as TensorBoard events.

The figures: per-position accuracy, survival, first divergence, exposure bias, confidence along the
rollouts (entropy, max-probability), loss by position, attention, samples.
Each plot takes `results`, a model's display name -> its `ModelResult` (attention maps included),
and returns a matplotlib Figure; `make_figures` draws them all and `save_figures` writes the PNGs
that report.md embeds. `write_model_events` writes one model's scalars, curves over k and j, and
sample texts to its own TensorBoard run, so that the same tags of different models overlay.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from pipeline.eval.results import Interval, ModelResult

PLOTS = "plots"
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
MODE_STYLE = {"greedy": "-", "sampled": "--", "nucleus": ":", "beam": "-."}
MODE_MARKER = {"greedy": "o", "sampled": "s", "nucleus": "^", "beam": "D"}
MODE_COLOR = {"greedy": "tab:blue", "sampled": "tab:orange", "nucleus": "tab:green", "beam": "tab:red"}


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def safe_name(name: str) -> str:
    """A display name as a file or TensorBoard run name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _band(ax: Axes, x, curve: Interval, c: str, style: str, label: str, shade: bool = True) -> None:
    ax.plot(x, curve.mean, style, color=c, label=label, linewidth=1.6)
    if shade:
        ax.fill_between(x, curve.low, curve.high, color=c, alpha=0.15, linewidth=0)


def mode_color(results: dict[str, ModelResult], i: int, mode: str) -> str:
    """One model: a colour per rollout mode; several: a colour per model (the line style tells the mode)."""
    return MODE_COLOR[mode] if len(results) == 1 else color(i)


def plot_accuracy(results: dict[str, ModelResult]) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, m) in enumerate(results.items()):
        k = np.arange(1, len(m.greedy.accuracy_by_position.mean) + 1)
        for mode, r in m.rollouts().items():
            label, c = f"{name} {mode}", mode_color(results, i, mode)
            _band(ax, k, r.accuracy_by_position, c, MODE_STYLE[mode], label, shade=mode == "greedy")
        ax.axhline(m.reference.teacher_forced_accuracy.mean, color=color(i), linestyle=":", linewidth=1)
    # Zoom to the data: with a 20% accurate model, a 0-1 axis flattens every curve onto the floor.
    highest = max(
        max(
            m.reference.teacher_forced_accuracy.mean,
            *(max(r.accuracy_by_position.mean) for r in m.rollouts().values()),
        )
        for m in results.values()
    )
    ax.set(
        xlabel="position k in the continuation",
        ylabel="a(k): share of prompts whose k-th token is right",
        ylim=(0, min(1.02, 1.2 * highest + 0.02)),
    )
    ax.set_title(
        "Per-position accuracy of free-running generation (dotted: teacher-forced accuracy p)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_survival(results: dict[str, ModelResult]) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    linear, log = fig.subplots(1, 2)
    for i, (name, m) in enumerate(results.items()):
        survival, pk = m.greedy.survival_by_position, m.reference.independence_prediction.mean
        k = np.arange(1, len(survival.mean) + 1)
        for ax in (linear, log):
            _band(ax, k, survival, color(i), "-", f"{name} S(k), greedy")
            ax.plot(k, pk, "--", color=color(i), linewidth=1.2, label=f"{name} p^k")
    linear.axhline(0.5, color="black", linewidth=0.8, alpha=0.5)
    linear.set(ylim=(0, 1.02), ylabel="share of prompts still matching the reference")
    log.set_yscale("log")
    floor = 0.5 / max(m.reference.prompts for m in results.values())
    log.set_ylim(floor, 1.05)
    # Show k up to where the last curve falls below what the prompts can resolve (at least 8 tokens).
    visible = [
        int(
            np.nonzero(
                np.maximum(m.greedy.survival_by_position.mean, m.reference.independence_prediction.mean)
                >= floor
            )[0].max(initial=0)
        )
        for m in results.values()
    ]
    n = len(next(iter(results.values())).greedy.survival_by_position.mean)
    right = min(n, max(8, 2 + max(visible)))
    for ax, scale in ((linear, "linear"), (log, "log")):
        ax.set(xlabel="k (tokens generated)", xlim=(0.5, right + 0.5))
        ax.set_title(f"Exact-prefix survival S(k) vs independence prediction p^k ({scale})", fontsize=10)
        ax.grid(alpha=0.3)
    linear.legend(fontsize=8)
    return fig


def plot_first_divergence(results: dict[str, ModelResult]) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for i, (name, m) in enumerate(results.items()):
        counts = np.asarray(m.greedy.first_divergence_histogram, dtype=float)
        k = np.arange(1, len(counts) + 1)
        ax.step(
            k,
            counts / max(counts.sum(), 1),
            where="mid",
            color=color(i),
            label=f"{name} (mean {m.greedy.first_divergence_mean.mean:.1f})",
        )
    n = len(next(iter(results.values())).greedy.first_divergence_histogram) - 1
    ax.set(
        xlabel=f"position of the first wrong token (greedy; {n + 1}: never within {n})",
        ylabel="share of prompts",
    )
    ax.set_title("Where greedy continuations first leave the reference", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


MODE_WORDS = {"greedy": "solid, circles", "sampled": "dashed, squares", "nucleus": "dotted, triangles"}
MODE_WORDS["beam"] = "dash-dot, diamonds"


def _mode_line(mode: str) -> dict[str, Any]:
    """Line style and marker of a rollout mode: the two tell greedy from sampled even in a legend's handle."""
    return {"linestyle": MODE_STYLE[mode], "marker": MODE_MARKER[mode], "markersize": 5}


def plot_exposure_gap(results: dict[str, ModelResult]) -> Figure:
    """The gap against j, one line per model and rollout mode: colour per model (one model: per mode),
    line style and marker per mode, each named in the legend; shaded: greedy's 95% interval."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    several = len(results) > 1
    modes: list[str] = []
    for i, (name, m) in enumerate(results.items()):
        for mode, r in m.rollouts().items():
            gap, c = r.exposure_gap, mode_color(results, i, mode)
            label = f"{name}, {mode} rollout"
            ax.plot(gap.j, gap.gap.mean, color=c, linewidth=1.6, label=label, **_mode_line(mode))
            if mode == "greedy":
                ax.fill_between(gap.j, gap.gap.low, gap.gap.high, color=c, alpha=0.15, linewidth=0)
            modes += [mode] if mode not in modes else []
    ax.axhline(0, color="black", linewidth=0.8)
    horizon = next(iter(results.values())).greedy.exposure_gap.horizon
    ax.set(
        xlabel="j: tokens of the model's own continuation in the context", ylabel="extra loss (nats/token)"
    )
    ax.set_title(
        f"Exposure-bias gap: loss on the next {horizon} true tokens after its own prefix minus after the true prefix",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    if several:  # two keys beside the axes: colour -> model, line style and marker -> rollout mode
        fig.set_figwidth(10.5)
        handles = [
            Line2D([], [], color=color(i), linewidth=2.5, label=name) for i, name in enumerate(results)
        ]
        fig.legend(handles=handles, title="model", fontsize=8, title_fontsize=8, loc="outside right upper")
        handles = [
            Line2D(
                [],
                [],
                color="dimgray",
                linewidth=1.6,
                label=f"{mode} ({MODE_WORDS[mode]})",
                **_mode_line(mode),
            )
            for mode in modes
        ]
        fig.legend(
            handles=handles,
            title="rollout (shaded: greedy 95% CI)",
            fontsize=8,
            title_fontsize=8,
            handlelength=4,
            loc="outside right lower",
        )
    else:
        ax.legend(title="shaded: greedy 95% CI", fontsize=8, title_fontsize=8, handlelength=4)
    return fig


def plot_rollout_confidence(results: dict[str, ModelResult]) -> Figure:
    """Entropy and max-probability of each model's own next-token distribution along its rollouts."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    entropy, top = fig.subplots(1, 2)
    for i, (name, m) in enumerate(results.items()):
        for mode, c in m.confidence.items():
            k = np.arange(1, len(c.entropy.mean) + 1)
            col, style, shade = mode_color(results, i, mode), MODE_STYLE[mode], mode == "greedy"
            _band(entropy, k, c.entropy, col, style, f"{name} {mode}", shade)
            _band(top, k, c.max_prob, col, style, f"{name} {mode}", shade)
    entropy.set(xlabel="position k in the continuation", ylabel="next-token entropy (nats)")
    top.set(xlabel="position k in the continuation", ylabel="max next-token probability", ylim=(0, 1.02))
    entropy.set_title("Entropy of the model's own distribution along its rollouts", fontsize=10)
    top.set_title("Max-probability along the rollouts (a loop: it rises)", fontsize=10)
    for ax in (entropy, top):
        ax.grid(alpha=0.3)
    entropy.legend(fontsize=8)
    return fig


def plot_loss_by_position(results: dict[str, ModelResult]) -> Figure:
    """Teacher-forced loss against the window position, with each model's trained max_seq_len marked."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, m) in enumerate(results.items()):
        lp = m.loss_by_position
        if lp is None:
            continue
        ax.plot(np.arange(lp.seq_len), lp.per_position, color=color(i), alpha=0.3, linewidth=0.8)
        mid = [(b.start + b.end - 1) / 2 for b in lp.buckets]
        ax.plot(mid, [b.loss for b in lp.buckets], "o-", color=color(i), label=f"{name} (bucket means)")
        if lp.trained_max_seq_len < lp.seq_len:
            ax.axvline(lp.trained_max_seq_len, color=color(i), linestyle="--", linewidth=1)
            ax.text(
                lp.trained_max_seq_len,
                0.98,
                " trained max_seq_len",
                color=color(i),
                fontsize=7,
                va="top",
                transform=ax.get_xaxis_transform(),
            )
    ax.set_xscale("symlog", linthresh=1)  # linear up to 1, then logarithmic: the buckets evenly spaced
    longest = max((m.loss_by_position.seq_len for m in results.values() if m.loss_by_position), default=1)
    ax.set_xlim(0, longest)
    ax.set(xlabel="position t in the window (predicting token t + 1)", ylabel="teacher-forced NLL (nats)")
    ax.set_title("Loss by position (causal view; past the dashed line: length extrapolation)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_attention_entropy(results: dict[str, ModelResult]) -> Figure:
    """Entropy per layer and head (viridis: dark low, bright high), each cell written out in a colour that
    reads on it; a collapsed head (mean max-probability above the threshold) is outlined in red."""
    names = list(results)
    fig = Figure(figsize=(3.2 * len(names) + 1, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names), squeeze=False)[0])
    top = max((float(np.max(results[n].attention.entropy, initial=0.0)) for n in names), default=1.0)
    image = None
    for ax, name in zip(axes, names):
        att = results[name].attention
        ent = np.asarray(att.entropy, dtype=float).reshape(len(att.entropy), -1)
        image = ax.imshow(ent, cmap="viridis", vmin=0, vmax=max(top, 1e-6), aspect="auto")
        collapsed = {tuple(cell) for cell in att.collapsed}
        for (layer, head), value in np.ndenumerate(ent):
            shade = image.cmap(image.norm(value))
            light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
            mark = (layer, head) in collapsed
            ax.text(
                head,
                layer,
                f"{value:.2f}" + ("\ncollapsed" if mark else ""),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if light else "white",
                fontweight="bold" if mark else "normal",
            )
            if mark:
                box = Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3)
                ax.add_patch(box)
        ax.set(
            xlabel="head", ylabel="layer", title=name, xticks=range(ent.shape[1]), yticks=range(ent.shape[0])
        )
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="mean attention entropy (nats)")
    threshold = results[names[0]].attention.collapse_threshold
    marked = any(results[n].attention.collapsed for n in names)
    collapse = (
        f"red box: collapsed, mean max-probability > {threshold}"
        if marked
        else f"no head collapsed: none has mean max-probability > {threshold}"
    )
    fig.suptitle(
        f"Attention entropy per layer and head on val (dark: sharp, bright: spread)\n{collapse}", fontsize=9
    )
    return fig


def plot_attention_maps(results: dict[str, ModelResult], max_layers: int = 4, max_heads: int = 8) -> Figure:
    maps = {name: np.asarray(m.attention.maps) for name, m in results.items()}  # (L, H, n, n) each
    rows = [(name, layer) for name, m in maps.items() for layer in range(min(len(m), max_layers))]
    heads = min(max(m.shape[1] for m in maps.values()), max_heads)
    fig = Figure(figsize=(max(1.8 * heads + 1, 6), 1.8 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), heads, squeeze=False)
    for r, (name, layer) in enumerate(rows):
        for h in range(heads):
            ax = axes[r, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < maps[name].shape[1]:
                ax.imshow(maps[name][layer, h], cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1))
                ax.set_title(f"L{layer} H{h}", fontsize=7)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(f"{name}\nlayer {layer}", fontsize=7)
    fig.suptitle(
        "Average attention maps on val (row: query, column: key; square-root colour scale)", fontsize=9
    )
    return fig


# --------------------------------------------------------------------------------------------------
# Sample texts
# --------------------------------------------------------------------------------------------------

Lines = list[list[tuple[int, str, str]]]  # lines of (column, text, colour) runs


def sample_label(name: str, mode: str) -> str:
    """A continuation's row label in the samples figure: the model's name and the rollout mode."""
    return f"{name}, {mode}"


def _visible(text: str) -> str:
    """One glyph per character: newlines as ↵, characters the monospace font may lack as ·."""
    return "".join("↵" if c == "\n" else c if c.isprintable() and ord(c) < 0x0530 else "·" for c in text)


def _wrapped(segments: list[tuple[str, str]], cols: int) -> Lines:
    """Coloured text segments -> lines of (column, text, colour) runs, wrapped at `cols` characters."""
    chars = [(c, col) for text, col in segments for c in _visible(text)] or [(" ", "black")]
    lines = []
    for start in range(0, len(chars), cols):
        runs: list[tuple[int, str, str]] = []
        for i, (c, col) in enumerate(chars[start : start + cols]):
            if runs and runs[-1][2] == col:
                runs[-1] = (runs[-1][0], runs[-1][1] + c, col)
            else:
                runs.append((i, c, col))
        lines.append(runs)
    return lines


def _sample_rows(results: dict[str, ModelResult], n: int, cols: int) -> list[tuple[str, str, Lines]]:
    """(label, label colour, lines) per shown text: each prompt, its reference, every model's continuations,
    labelled with the model's whole name and the rollout mode."""
    rows: list[tuple[str, str, Lines]] = []
    first = next(iter(results.values()))
    for s, sample in enumerate(first.samples[:n]):
        rows.append((f"prompt {s + 1}", "dimgray", _wrapped([(sample.prompt, "dimgray")], cols)))
        rows.append(("true continuation", "black", _wrapped([(sample.reference, "navy")], cols)))
        for i, (name, m) in enumerate(results.items()):
            for mode, c in m.samples[s].continuations.items():
                text, cut = c.text, c.diverge_char
                rows.append(
                    (
                        sample_label(name, mode),
                        color(i),
                        _wrapped([(text[:cut], "black"), (text[cut:], "red")], cols),
                    )
                )
        rows.append(("", "black", []))
    return rows


def plot_samples(results: dict[str, ModelResult], n: int = 2, cols: int = 96, size: float = 8.0) -> Figure:
    """Prompt, reference and every model's continuations; black up to the first wrong token, red after."""
    rows = _sample_rows(results, n, cols)
    label_cols = max(len(label) for label, _, _ in rows) + 2  # every label whole
    char_w, line_h = 0.6 * size / 72, 1.45 * size / 72  # inches; DejaVu Mono is 0.6 em wide
    n_lines = sum(max(len(lines), 1) for _, _, lines in rows) + 2
    width, height = (label_cols + cols) * char_w + 0.4, n_lines * line_h + 0.4
    fig = Figure(figsize=(width, height))
    text = {"size": size, "va": "top", "family": "monospace"}
    legend = "black: same tokens as the true continuation; red: from the first wrong token on (↵ = newline)"
    fig.text(0.2 / width, 1 - 0.2 / height, legend, **text, color="dimgray")
    y = 0.2 + line_h
    for label, label_color, lines in rows:
        fig.text(0.2 / width, 1 - y / height, label, **text, parse_math=False, color=label_color)
        for runs in lines or [[]]:
            for column, run, col in runs:
                x = 0.2 + (label_cols + column) * char_w
                fig.text(x / width, 1 - y / height, run, **text, parse_math=False, color=col)
            y += line_h
    return fig


def make_figures(results: dict[str, ModelResult], samples: int) -> dict[str, Figure]:
    figures = {
        "accuracy_by_position": plot_accuracy(results),
        "survival": plot_survival(results),
        "first_divergence": plot_first_divergence(results),
        "exposure_gap": plot_exposure_gap(results),
        "rollout_confidence": plot_rollout_confidence(results),
        "loss_by_position": plot_loss_by_position(results),
        "attention_entropy": plot_attention_entropy(results),
        "attention_maps": plot_attention_maps(results),
    }
    if samples:
        figures["samples"] = plot_samples(results, n=samples)
    return figures


def save_figures(figures: dict[str, Figure], out: Path) -> dict[str, Path]:
    """Each figure as out/plots/<name>.png; returns the paths."""
    (out / PLOTS).mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out / PLOTS / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
    return paths


# --------------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------------


ATTENTION, SAMPLES = "eval_attention", "eval_samples"
"""Evaluate's attention scalars and sample texts: tag groups of their own, apart from training's
attention/ and samples, so `tensorboard --logdir runs` shows no evaluate point on a training card."""


def model_scalars(m: ModelResult) -> dict[str, float]:
    """The single-number metrics of one model, as TensorBoard tags."""
    tf = m.teacher_forced
    out: dict[str, float | None] = {
        "eval/val_loss": tf.val_loss,
        "eval/bits_per_byte": tf.bits_per_byte,
        "eval/top1_acc": tf.top1_acc,
        "eval/top5_acc": tf.top5_acc,
        "eval/ece": tf.ece,
        "eval/teacher_forced_accuracy": m.reference.teacher_forced_accuracy.mean,
    }
    if m.leaky is not None:  # as trained, mask off; the eval/ tags above are the causal view
        out |= {"eval_leaky/val_loss": m.leaky.val_loss, "eval_leaky/top1_acc": m.leaky.top1_acc}
        out["eval_leaky/bits_per_byte"] = m.leaky.bits_per_byte
    for mode, r in m.rollouts().items():
        out[f"{mode}/first_divergence_mean"] = r.first_divergence_mean.mean
        out[f"{mode}/first_divergence_median"] = r.first_divergence_median.mean
        out[f"{mode}/wer"] = r.wer.mean
        out[f"{mode}/cer"] = r.cer.mean
        out[f"{mode}/diverged_fraction"] = r.diverged_fraction
        out[f"{mode}/repetition_rate"] = r.degeneration.repetition_rate.mean
        out[f"{mode}/looping"] = r.degeneration.looping.mean
        if r.judge:
            out[f"{mode}/judge_nll"] = r.judge.nll.mean
            out[f"{mode}/agreement_rollout"] = r.judge.agreement_rollout.mean
    return {k: float(v) for k, v in out.items() if v is not None}


def write_model_events(writer: Any, m: ModelResult) -> None:
    """One model's scalars, curves over k and j (as steps), attention and sample texts to its own
    TensorBoard run, so that the same tags of different models overlay."""
    for tag, value in model_scalars(m).items():
        writer.add_scalar(tag, value, 0)
    reference = zip(m.reference.teacher_forced_accuracy_by_position, m.reference.independence_prediction.mean)
    for k, (tf, pk) in enumerate(reference, start=1):
        writer.add_scalar("compounding/teacher_forced_accuracy", tf, k)
        writer.add_scalar("compounding/independence_prediction", pk, k)
    for mode, r in m.rollouts().items():
        for k, (a, s) in enumerate(zip(r.accuracy_by_position.mean, r.survival_by_position.mean), start=1):
            writer.add_scalar(f"compounding/accuracy_{mode}", a, k)
            writer.add_scalar(f"compounding/survival_{mode}", s, k)
        gap = r.exposure_gap
        for j, value, own, true in zip(gap.j, gap.gap.mean, gap.own_prefix_loss, gap.true_prefix_loss):
            writer.add_scalar(f"exposure_gap/{mode}", value, j)
            writer.add_scalar(f"exposure_gap/{mode}_loss_after_own", own, j)
            writer.add_scalar(f"exposure_gap/{mode}_loss_after_true", true, j)
    for mode, c in m.confidence.items():
        for k, (ent, top) in enumerate(zip(c.entropy.mean, c.max_prob.mean), start=1):
            writer.add_scalar(f"rollout_entropy/{mode}", ent, k)
            writer.add_scalar(f"rollout_max_prob/{mode}", top, k)
    if m.loss_by_position is not None:
        lp = m.loss_by_position
        for t, loss in enumerate(lp.per_position):
            writer.add_scalar("loss_by_position/per_position", loss, t)
        for b in lp.buckets:  # step: the bucket's first position
            writer.add_scalar("loss_by_position/bucket", b.loss, b.start)
        writer.add_scalar("loss_by_position/trained_max_seq_len", lp.trained_max_seq_len, 0)
    for name in ("entropy", "max_prob"):  # eval_attention/: training's attention/ tags stay the training's
        for layer, row in enumerate(getattr(m.attention, name)):
            for head, value in enumerate(row):
                writer.add_scalar(f"{ATTENTION}/{name}/layer{layer}_head{head}", value, 0)
    for s, sample in enumerate(m.samples):
        parts = [f"prompt:\n{sample.prompt}", f"reference:\n{sample.reference}"]
        parts += [f"{mode}:\n{c.text}" for mode, c in sample.continuations.items()]
        writer.add_text(SAMPLES, "```\n" + "\n\n".join(parts) + "\n```", s)
