"""The evaluation report: PNG plots, a Markdown `report.md` that embeds them, and TensorBoard.

`results` maps a model's display name to its metrics (the `models` entry of metrics.json, with the
attention maps as arrays). The report leads with the answer to "which model drifts sooner, and by
how much", then the tables and plots behind it, then definitions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

PLOTS = "plots"
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
MODE_STYLE = {"greedy": "-", "sampled": "--"}


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def safe_name(name: str) -> str:
    """A display name as a file or TensorBoard run name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def rollouts(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'greedy': ..., 'sampled': ...}: the rollout metrics of one model (greedy ones live at the top level)."""
    out = {"greedy": metrics}
    if "sampled" in metrics:
        out["sampled"] = metrics["sampled"]
    return out


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _band(ax, x, mean, ci, c: str, style: str, label: str) -> None:
    ax.plot(x, mean, style, color=c, label=label, linewidth=1.6)
    if ci is not None:
        ax.fill_between(x, ci[0], ci[1], color=c, alpha=0.15, linewidth=0)


def plot_accuracy(results: dict[str, dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, m) in enumerate(results.items()):
        k = np.arange(1, len(m["accuracy_by_position"]) + 1)
        for mode, r in rollouts(m).items():
            _band(
                ax,
                k,
                r["accuracy_by_position"],
                r["accuracy_by_position_ci"] if mode == "greedy" else None,
                color(i),
                MODE_STYLE[mode],
                f"{name} {mode}",
            )
        ax.axhline(m["teacher_forced_accuracy"], color=color(i), linestyle=":", linewidth=1)
    # Zoom to the data: with a 20% accurate model, a 0-1 axis flattens every curve onto the floor.
    highest = max(
        max(m["teacher_forced_accuracy"], *(max(r["accuracy_by_position"]) for r in rollouts(m).values()))
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


def plot_survival(results: dict[str, dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    linear, log = fig.subplots(1, 2)
    for i, (name, m) in enumerate(results.items()):
        k = np.arange(1, len(m["survival_by_position"]) + 1)
        for ax in (linear, log):
            _band(
                ax,
                k,
                m["survival_by_position"],
                m["survival_by_position_ci"],
                color(i),
                "-",
                f"{name} S(k), greedy",
            )
            ax.plot(k, m["independence_prediction"], "--", color=color(i), linewidth=1.2, label=f"{name} p^k")
    linear.axhline(0.5, color="black", linewidth=0.8, alpha=0.5)
    linear.set(ylim=(0, 1.02), ylabel="share of prompts still matching the reference")
    log.set_yscale("log")
    floor = 0.5 / max(m["prompts"] for m in results.values())
    log.set_ylim(floor, 1.05)
    # Show k up to where the last curve falls below what the prompts can resolve (at least 8 tokens).
    visible = [
        int(
            np.nonzero(np.maximum(m["survival_by_position"], m["independence_prediction"]) >= floor)[0].max(
                initial=0
            )
        )
        for m in results.values()
    ]
    right = min(len(results[next(iter(results))]["survival_by_position"]), max(8, 2 + max(visible)))
    for ax, scale in ((linear, "linear"), (log, "log")):
        ax.set(xlabel="k (tokens generated)", xlim=(0.5, right + 0.5))
        ax.set_title(f"Exact-prefix survival S(k) vs independence prediction p^k ({scale})", fontsize=10)
        ax.grid(alpha=0.3)
    linear.legend(fontsize=8)
    return fig


def plot_first_divergence(results: dict[str, dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for i, (name, m) in enumerate(results.items()):
        counts = np.asarray(m["first_divergence_histogram"], dtype=float)
        k = np.arange(1, len(counts) + 1)
        ax.step(
            k,
            counts / max(counts.sum(), 1),
            where="mid",
            color=color(i),
            label=f"{name} (mean {m['first_divergence_mean']:.1f})",
        )
    n = len(next(iter(results.values()))["first_divergence_histogram"]) - 1
    ax.set(
        xlabel=f"position of the first wrong token (greedy; {n + 1}: never within {n})",
        ylabel="share of prompts",
    )
    ax.set_title("Where greedy continuations first leave the reference", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_exposure_gap(results: dict[str, dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, m) in enumerate(results.items()):
        for mode, r in rollouts(m).items():
            gap = r["exposure_gap"]
            _band(ax, gap["j"], gap["gap"], gap["gap_ci"], color(i), MODE_STYLE[mode] + "o", f"{name} {mode}")
    ax.axhline(0, color="black", linewidth=0.8)
    horizon = next(iter(results.values()))["exposure_gap"]["horizon"]
    ax.set(
        xlabel="j: tokens of the model's own continuation in the context", ylabel="extra loss (nats/token)"
    )
    ax.set_title(
        f"Exposure-bias gap: loss on the next {horizon} true tokens after its own prefix minus after the true prefix",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_attention_entropy(results: dict[str, dict[str, Any]]) -> Figure:
    names = list(results)
    fig = Figure(figsize=(3.2 * len(names) + 1, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names), squeeze=False)[0])
    top = max(float(np.max(results[n]["attention"]["entropy"])) for n in names)
    image = None
    for ax, name in zip(axes, names):
        att = results[name]["attention"]
        ent = np.asarray(att["entropy"])
        image = ax.imshow(ent, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        for (layer, head), value in np.ndenumerate(ent):
            collapsed = [layer, head] in att["collapsed"]
            ax.text(
                head,
                layer,
                f"{value:.2f}" + ("\ncollapsed" if collapsed else ""),
                ha="center",
                va="center",
                fontsize=7,
                color="red" if collapsed else "white",
            )
        ax.set(
            xlabel="head", ylabel="layer", title=name, xticks=range(ent.shape[1]), yticks=range(ent.shape[0])
        )
    fig.colorbar(image, ax=list(axes), label="mean attention entropy (nats)")
    fig.suptitle("Attention entropy per layer and head on val (low: sharp; red: collapsed)", fontsize=10)
    return fig


def plot_attention_maps(
    results: dict[str, dict[str, Any]], max_layers: int = 4, max_heads: int = 8
) -> Figure:
    rows = [
        (name, layer)
        for name, m in results.items()
        for layer in range(min(len(m["attention"]["maps"]), max_layers))
    ]
    heads = min(max(np.asarray(m["attention"]["maps"]).shape[1] for m in results.values()), max_heads)
    fig = Figure(figsize=(max(1.8 * heads + 1, 6), 1.8 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), heads, squeeze=False)
    for r, (name, layer) in enumerate(rows):
        maps = np.asarray(results[name]["attention"]["maps"])
        for h in range(heads):
            ax = axes[r, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < maps.shape[1]:
                ax.imshow(maps[layer, h], cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1))
                ax.set_title(f"L{layer} H{h}", fontsize=7)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(f"{name}\nlayer {layer}", fontsize=7)
    fig.suptitle(
        "Average attention maps on val (row: query, column: key; square-root colour scale)", fontsize=9
    )
    return fig


def _visible(text: str) -> str:
    """One glyph per character: newlines as ↵, characters the monospace font may lack as ·."""
    return "".join("↵" if c == "\n" else c if c.isprintable() and ord(c) < 0x0530 else "·" for c in text)


def _wrapped(segments: list[tuple[str, str]], cols: int) -> list[list[tuple[int, str, str]]]:
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


def plot_samples(results: dict[str, dict[str, Any]], n: int = 2, cols: int = 96, size: float = 8.0) -> Figure:
    """Prompt, reference and every model's continuations; black up to the first wrong token, red after."""
    rows: list[tuple[str, str, list[list[tuple[int, str, str]]]]] = []  # (label, label colour, lines)
    first = next(iter(results.values()))
    for s, sample in enumerate(first["samples"][:n]):
        rows.append((f"prompt {s + 1}", "dimgray", _wrapped([(sample["prompt"], "dimgray")], cols)))
        rows.append(("reference", "black", _wrapped([(sample["reference"], "navy")], cols)))
        for i, (name, m) in enumerate(results.items()):
            for mode in rollouts(m):
                text, cut = m["samples"][s][mode], m["samples"][s][f"{mode}_diverge_char"]
                rows.append(
                    (f"{name} {mode}", color(i), _wrapped([(text[:cut], "black"), (text[cut:], "red")], cols))
                )
        rows.append(("", "black", []))
    label_cols, char_w, line_h = (
        24,
        0.6 * size / 72,
        1.45 * size / 72,
    )  # inches; DejaVu Sans Mono is 0.6 em wide
    n_lines = sum(max(len(lines), 1) for _, _, lines in rows) + 2
    width, height = (label_cols + cols) * char_w + 0.4, n_lines * line_h + 0.4
    fig = Figure(figsize=(width, height))
    y = 0.2 + line_h
    fig.text(
        0.2 / width,
        1 - 0.2 / height,
        "black: same tokens as the reference; red: from the first wrong token on (↵ = newline)",
        size=size,
        va="top",
        family="monospace",
        color="dimgray",
    )
    for label, label_color, lines in rows:
        fig.text(
            0.2 / width,
            1 - y / height,
            label[: label_cols - 1],
            size=size,
            va="top",
            family="monospace",
            color=label_color,
        )
        for runs in lines or [[]]:
            for column, text, col in runs:
                x = 0.2 + (label_cols + column) * char_w
                fig.text(
                    x / width,
                    1 - y / height,
                    text,
                    size=size,
                    va="top",
                    family="monospace",
                    parse_math=False,
                    color=col,
                )
            y += line_h
    return fig


def make_figures(results: dict[str, dict[str, Any]], samples: int) -> dict[str, Figure]:
    figures = {
        "accuracy_by_position": plot_accuracy(results),
        "survival": plot_survival(results),
        "first_divergence": plot_first_divergence(results),
        "exposure_gap": plot_exposure_gap(results),
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
# Markdown
# --------------------------------------------------------------------------------------------------


def fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def fmt_ci(value: float, ci: list[float], digits: int = 3) -> str:
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def survival_at(m: dict[str, Any], k: int) -> tuple[float, list[float], float, list[float]]:
    """S(k), its interval, p^k and its interval (k 1-based)."""
    i = k - 1
    s_ci, p_ci = m["survival_by_position_ci"], m["independence_prediction_ci"]
    return (
        m["survival_by_position"][i],
        [s_ci[0][i], s_ci[1][i]],
        m["independence_prediction"][i],
        [p_ci[0][i], p_ci[1][i]],
    )


def comparison_k(m: dict[str, Any]) -> int:
    """Where S(k) against p^k says most: the largest k in 1, 2, 4, ..., N with p^k >= 5%."""
    n, p = len(m["independence_prediction"]), m["teacher_forced_accuracy"]
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n and p ** (2**i) >= 0.05]
    return ks[-1] if ks else 1


def _verdict(s_ci: list[float], p_ci: list[float]) -> str:
    if s_ci[0] > p_ci[1]:
        return "above it: errors cluster, the prompts a model gets right it tends to keep getting right"
    if s_ci[1] < p_ci[0]:
        return "below it: one error makes the next likelier even before the context goes wrong"
    return "consistent with independent errors"


def headline(results: dict[str, dict[str, Any]]) -> list[str]:
    """The report's first bullets: who drifts sooner and by how much, then why."""
    order = sorted(results, key=lambda name: results[name]["first_divergence_mean"])
    n = len(results[order[0]]["accuracy_by_position"])
    lines = []
    if len(order) > 1:
        early, late = results[order[0]], results[order[-1]]
        ratio = late["first_divergence_mean"] / max(early["first_divergence_mean"], 1e-9)
        apart = early["first_divergence_mean_ci"][1] < late["first_divergence_mean_ci"][0]
        lines.append(
            f"**{order[0]}** drifts soonest: its greedy continuations make their first wrong token at "
            f"k = {early['first_divergence_mean']:.1f} on average, against k = {late['first_divergence_mean']:.1f} "
            f"for **{order[-1]}**, which stays on the reference {ratio:.1f}x as long"
            + ("." if apart else " (but their 95% intervals overlap: no clear difference on these prompts).")
        )
    for name in order:
        m = results[name]
        half = m["half_life"]
        when = (
            f"half of its continuations have left the reference by k = {half}"
            if half
            else f"over half still match after all {n} tokens"
        )
        k = comparison_k(m)
        s, s_ci, pk, pk_ci = survival_at(m, k)
        a = m["accuracy_by_position"]
        lines.append(
            f"**{name}**: right on {pct(m['teacher_forced_accuracy'])} of next tokens under teacher forcing, but its "
            f"greedy continuations are right on {pct(a[0])} at k = 1, {pct(float(np.mean(a)))} on average over "
            f"k = 1..{n} and {pct(a[-1])} at k = {n}. First wrong token at k = "
            f"{fmt_ci(m['first_divergence_mean'], m['first_divergence_mean_ci'], 1)} (median "
            f"{fmt(m['first_divergence_median'], 0)}); {when}; WER {fmt(m['wer'], 2)}. Independent errors would give "
            f"S({k}) = p^{k} = {pct(pk)}; measured S({k}) = {pct(s)} [{pct(s_ci[0])}, {pct(s_ci[1])}], "
            f"{_verdict(s_ci, pk_ci)}."
        )
    for name in order:
        gap = results[name]["exposure_gap"]
        lines.append(
            f"Exposure bias, **{name}**: after its own first {gap['j'][-1]} tokens, its loss on the next "
            f"{gap['horizon']} true tokens is {gap['gap'][-1]:+.3f} nats/token [{gap['gap_ci'][0][-1]:+.3f}, "
            f"{gap['gap_ci'][1][-1]:+.3f}] compared with after the true prefix."
        )
    for name in order:
        judge = results[name].get("judge")
        if judge and judge["teacher"] != name:  # the judge agrees with itself trivially
            lines.append(
                f"Judge **{judge['teacher']}** on **{name}**: {judge['nll']:.3f} nats/token for its greedy continuations "
                f"(the true ones: {judge['nll_reference']:.3f}); top-1 agreement {pct(judge['agreement_rollout'])} along "
                f"its own rollouts vs {pct(judge['agreement_data'])} along the data."
            )
    return lines


def _glance(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            f"**{name}**",
            m.get("kind", "–"),
            fmt(m.get("parameters")),
            fmt(m["val_loss"]),
            fmt(m["bits_per_byte"]),
            pct(m["top1_acc"]),
            fmt(m["half_life"]),
            fmt_ci(m["first_divergence_mean"], m["first_divergence_mean_ci"], 2),
            fmt(m["first_divergence_median"], 1),
            fmt_ci(m["wer"], m["wer_ci"], 3),
            fmt_ci(m["cer"], m["cer_ci"], 3),
        ]
        for name, m in results.items()
    ]
    header = [
        "model",
        "kind",
        "parameters",
        "val loss",
        "bits/byte",
        "top-1 (teacher-forced)",
        "half-life k½",
    ]
    return table([*header, "first wrong token, mean [95% CI]", "median", "WER", "CER"], rows)


def _survival_table(results: dict[str, dict[str, Any]]) -> str:
    n = len(next(iter(results.values()))["survival_by_position"])
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    rows = []
    for name, m in results.items():
        cells = []
        for k in ks:
            s, _, pk, _ = survival_at(m, k)
            cells.append(f"{pct(s)} / {pct(pk)}")
        rows.append([f"**{name}**", fmt(m["teacher_forced_accuracy"], 3), *cells])
    return table(["model", "p", *[f"S({k}) / p^{k}" for k in ks]], rows)


def _rollout_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, m in results.items():
        for mode, r in rollouts(m).items():
            acc = r["accuracy_by_position"]
            rows.append(
                [
                    f"**{name}**",
                    mode,
                    pct(acc[0]),
                    pct(acc[-1]),
                    pct(float(np.mean(acc))),
                    fmt_ci(r["first_divergence_mean"], r["first_divergence_mean_ci"], 2),
                    fmt(r["half_life"]),
                    pct(r["diverged_fraction"]),
                    fmt_ci(r["wer"], r["wer_ci"], 3),
                    fmt_ci(r["cer"], r["cer_ci"], 3),
                ]
            )
    n = len(next(iter(results.values()))["accuracy_by_position"])
    header = [
        "model",
        "rollout",
        "a(1)",
        f"a({n})",
        "mean a(k)",
        "first wrong token",
        "half-life",
        f"diverged within {n}",
    ]
    return table([*header, "WER", "CER"], rows)


def _gap_table(results: dict[str, dict[str, Any]]) -> str:
    js = next(iter(results.values()))["exposure_gap"]["j"]
    rows = []
    for name, m in results.items():
        for mode, r in rollouts(m).items():
            gap = r["exposure_gap"]
            rows.append([f"**{name}**", mode, *[f"{g:+.3f}" for g in gap["gap"]]])
    return table(["model", "rollout", *[f"j = {j}" for j in js]], rows)


def _judge_table(results: dict[str, dict[str, Any]]) -> str | None:
    rows = []
    for name, m in results.items():
        for mode, r in rollouts(m).items():
            judge = r.get("judge")
            if judge:
                rows.append(
                    [
                        f"**{name}**",
                        mode,
                        fmt_ci(judge["nll"], judge["nll_ci"]),
                        fmt_ci(judge["nll_reference"], judge["nll_reference_ci"]),
                        fmt_ci(judge["agreement_rollout"], judge["agreement_rollout_ci"]),
                        fmt_ci(judge["agreement_data"], judge["agreement_data_ci"]),
                    ]
                )
    if not rows:
        return None
    header = ["model", "rollout", "judge NLL of its continuation", "judge NLL of the true one"]
    return table([*header, "top-1 agreement along its rollout", "along the data"], rows)


def _degeneration_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, m in results.items():
        for mode, r in rollouts(m).items():
            d = r["degeneration"]
            rows.append(
                [
                    f"**{name}**",
                    mode,
                    fmt_ci(d["repetition_rate"], d["repetition_rate_ci"]),
                    fmt(d["distinct_1"]),
                    fmt(d["distinct_2"]),
                    f"{pct(d['looping'])} [{pct(d['looping_ci'][0])}, {pct(d['looping_ci'][1])}]",
                ]
            )
    return table(
        ["model", "rollout", "repetition rate (4-grams)", "distinct-1", "distinct-2", "ends in a loop"], rows
    )


def _teacher_forced_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            f"**{name}**",
            fmt(m["val_loss"]),
            fmt(m["val_ppl"], 2),
            fmt(m["bits_per_byte"]),
            pct(m["top1_acc"]),
            pct(m["top5_acc"]),
            fmt(m["ece"]),
            fmt(int(m["val_tokens"])),
        ]
        for name, m in results.items()
    ]
    return table(
        ["model", "val loss (nats)", "perplexity", "bits/byte", "top-1", "top-5", "ECE", "val tokens"], rows
    )


def _attention_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, m in results.items():
        att = m["attention"]
        ent = np.asarray(att["entropy"])
        collapsed = ", ".join(f"L{layer} H{head}" for layer, head in att["collapsed"]) or "none"
        rows.append(
            [
                f"**{name}**",
                f"{ent.shape[0]} x {ent.shape[1]}",
                f"{ent.min():.2f} – {ent.max():.2f}",
                f"{np.max(att['max_prob']):.2f}",
                collapsed,
            ]
        )
    threshold = next(iter(results.values()))["attention"]["collapse_threshold"]
    return table(
        [
            "model",
            "layers x heads",
            "entropy (nats)",
            "largest mean max-prob",
            f"collapsed (max-prob > {threshold})",
        ],
        rows,
    )


DEFINITIONS = """\
* **a(k)**: share of prompts whose k-th generated token equals the k-th true token.
* **S(k)**, survival: share of prompts whose first k generated tokens all equal the true ones.
  **p^k**: what S(k) would be if each token were right with the teacher-forced probability p
  independently. **Half-life k½**: the first k with S(k) < 1/2.
* **First wrong token**: position of the first mismatch; a continuation that never leaves the
  reference counts as N + 1, so the mean is a lower bound when many survive.
* **WER / CER**: word / character edit distance between the generated and the true continuation,
  divided by the true one's length (can exceed 1).
* **Exposure-bias gap** at j: mean NLL of the next true tokens after [prompt, the model's own first
  j tokens] minus after [prompt, the first j true tokens]; 0 at j = 0.
* **Judge**: a teacher's NLL of a model's continuation, and how often judge and model agree on the
  most likely next token along the model's rollout versus along the data.
* **Repetition rate**: share of 4-grams already seen earlier in the continuation; **distinct-n**:
  distinct n-grams / n-grams; **ends in a loop**: the continuation ends in at least 3 repeats of a
  period (and at least 8 tokens).
* **Collapsed head**: mean max attention probability above the threshold (attends to one token).
* A reference token outside a compact model's kept ids never counts as matched. Brackets: 95%
  bootstrap intervals over prompts. Losses are nats per token over the full vocabulary.
"""


def _samples_markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(results.values()))
    out = []
    for s, sample in enumerate(first["samples"]):
        out += [
            f"**Prompt {s + 1}**",
            "",
            "```",
            sample["prompt"],
            "```",
            "",
            "True continuation:",
            "",
            "```",
            sample["reference"],
            "```",
            "",
        ]
        for name, m in results.items():
            for mode in rollouts(m):
                out += [
                    f"{name}, {mode} (first {m['samples'][s][f'{mode}_diverge_char']} characters match):",
                    "",
                    "```",
                    m["samples"][s][mode],
                    "```",
                    "",
                ]
    return out


def _introduction(results: dict[str, dict[str, Any]], context: dict[str, Any]) -> list[str]:
    sampling = (
        f" and by sampling (temperature {context['temperature']}, top-k {context['top_k'] or 'off'}, "
        f"top-p {context['top_p']})"
    )
    return [
        "# Compounding errors: " + ", ".join(results),
        "",
        f"Val split of `{context['data']}`: {context['prompts']} prompts of {context['prompt_tokens']} tokens at "
        f"seeded positions (seed {context['seed']}); each model continues every prompt by {context['new_tokens']} "
        f"tokens greedily{sampling if context['sampled'] else ''}, compared with the true continuation. "
        "Brackets: 95% bootstrap intervals over prompts.",
        "",
        "## The answer",
        "",
        *[f"* {line}" for line in headline(results)],
        "",
    ]


def _drift_sections(results: dict[str, dict[str, Any]], plots: dict[str, str]) -> list[str]:
    return [
        "## At a glance (greedy rollouts)",
        "",
        _glance(results),
        "",
        f"![per-position accuracy]({plots['accuracy_by_position']})",
        "",
        "## Errors compound: survival against the independence prediction",
        "",
        "Cells: measured S(k) / predicted p^k. While a greedy continuation still matches, the model sees the true",
        "context, so S(k) is the chance of k correct teacher-forced predictions in a row; p^k assumes they are "
        "independent.",
        "",
        _survival_table(results),
        "",
        f"![survival]({plots['survival']})",
        "",
        f"![first divergence]({plots['first_divergence']})",
        "",
        "## Greedy and sampled rollouts",
        "",
        _rollout_table(results),
        "",
        "## Exposure bias",
        "",
        "Extra loss (nats/token) on the true continuation after j tokens of the model's own text instead of the "
        "true text:",
        "",
        _gap_table(results),
        "",
        f"![exposure-bias gap]({plots['exposure_gap']})",
        "",
    ]


def _model_sections(
    results: dict[str, dict[str, Any]], context: dict[str, Any], plots: dict[str, str]
) -> list[str]:
    judge = _judge_table(results)
    lines = [
        "## Teacher as judge",
        "",
        f"Judge: {context['judge']} ({context['judge_rule']}).",
        "",
        judge,
        "",
    ]
    return (lines if judge else []) + [
        "## Degeneration",
        "",
        _degeneration_table(results),
        "",
        "## Teacher-forced metrics",
        "",
        _teacher_forced_table(results),
        "",
        "## Attention",
        "",
        _attention_table(results),
        "",
        f"![attention entropy]({plots['attention_entropy']})",
        "",
        f"![attention maps]({plots['attention_maps']})",
        "",
    ]


def markdown(results: dict[str, dict[str, Any]], context: dict[str, Any], plots: dict[str, str]) -> str:
    """The whole report.md; `plots` maps figure names to paths relative to the report."""
    lines = (
        _introduction(results, context)
        + _drift_sections(results, plots)
        + _model_sections(results, context, plots)
    )
    if "samples" in plots:
        lines += ["## Samples", "", f"![samples]({plots['samples']})", "", *_samples_markdown(results)]
    lines += ["## Definitions", "", DEFINITIONS]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------------


def model_scalars(m: dict[str, Any]) -> dict[str, float]:
    """The single-number metrics of one model, as TensorBoard tags."""
    out = {f"eval/{key}": m[key] for key in ("val_loss", "bits_per_byte", "top1_acc", "top5_acc", "ece")}
    out["eval/teacher_forced_accuracy"] = m["teacher_forced_accuracy"]
    for mode, r in rollouts(m).items():
        for key in ("first_divergence_mean", "first_divergence_median", "wer", "cer", "diverged_fraction"):
            out[f"{mode}/{key}"] = r[key]
        out[f"{mode}/repetition_rate"] = r["degeneration"]["repetition_rate"]
        out[f"{mode}/looping"] = r["degeneration"]["looping"]
        if r.get("judge"):
            out[f"{mode}/judge_nll"] = r["judge"]["nll"]
            out[f"{mode}/agreement_rollout"] = r["judge"]["agreement_rollout"]
    return {k: float(v) for k, v in out.items() if v is not None}


def write_model_events(writer: Any, m: dict[str, Any]) -> None:
    """One model's scalars, curves over k and j (as steps), attention and sample texts to its own
    TensorBoard run, so that the same tags of different models overlay."""
    for tag, value in model_scalars(m).items():
        writer.add_scalar(tag, value, 0)
    for k, (tf, pk) in enumerate(
        zip(m["teacher_forced_accuracy_by_position"], m["independence_prediction"]), start=1
    ):
        writer.add_scalar("compounding/teacher_forced_accuracy", tf, k)
        writer.add_scalar("compounding/independence_prediction", pk, k)
    for mode, r in rollouts(m).items():
        for k, (a, s) in enumerate(zip(r["accuracy_by_position"], r["survival_by_position"]), start=1):
            writer.add_scalar(f"compounding/accuracy_{mode}", a, k)
            writer.add_scalar(f"compounding/survival_{mode}", s, k)
        for j, gap in zip(r["exposure_gap"]["j"], r["exposure_gap"]["gap"]):
            writer.add_scalar(f"exposure_gap/{mode}", gap, j)
    for layer, row in enumerate(m["attention"]["entropy"]):
        for head, value in enumerate(row):
            writer.add_scalar(f"attention/entropy/layer{layer}_head{head}", value, 0)
    for s, sample in enumerate(m["samples"]):
        parts = [f"prompt:\n{sample['prompt']}", f"reference:\n{sample['reference']}"]
        parts += [f"{mode}:\n{sample[mode]}" for mode in rollouts(m)]
        writer.add_text("samples", "```\n" + "\n\n".join(parts) + "\n```", s)
