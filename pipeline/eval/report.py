"""The evaluation report: `report.md`, in Markdown, embedding the plots of pipeline.eval.plots.

`results` maps a model's display name to its `ModelResult` (pipeline.eval.results). The report
leads with the answer to "which model drifts sooner, and by how much", then the tables and plots
behind it, then definitions.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.eval.results import Context, Interval, ModelResult, RolloutResult, TeacherForced

# --------------------------------------------------------------------------------------------------
# Numbers and tables
# --------------------------------------------------------------------------------------------------


def fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def fmt_ci(interval: Interval[float], digits: int = 3) -> str:
    return f"{fmt(interval.mean, digits)} [{fmt(interval.low, digits)}, {fmt(interval.high, digits)}]"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _at(curve: Interval[list[float]], k: int) -> Interval[float]:
    """A curve's value and interval at position k (1-based)."""
    return Interval(curve.mean[k - 1], curve.low[k - 1], curve.high[k - 1])


def survival_at(m: ModelResult, k: int) -> tuple[Interval[float], Interval[float]]:
    """Greedy S(k) and p^k, each with its interval (k 1-based)."""
    return _at(m.greedy.survival_by_position, k), _at(m.reference.independence_prediction, k)


def comparison_k(m: ModelResult) -> int:
    """Where S(k) against p^k says most: the largest k in 1, 2, 4, ..., N with p^k >= 5%."""
    n, p = len(m.reference.independence_prediction.mean), m.reference.teacher_forced_accuracy.mean
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n and p ** (2**i) >= 0.05]
    return ks[-1] if ks else 1


def tokens(n: float) -> str:
    """A token count as the report and the printed lines give it: '4,096 tokens'."""
    return f"{int(n):,} tokens"


def gap_at_end(m: ModelResult, mode: str = "greedy") -> tuple[int, float, float, float]:
    """The exposure-bias gap at the largest j of a rollout: (j, gap, loss after the model's own j tokens,
    loss after the true j tokens), losses in nats/token on the next `horizon` true tokens."""
    gap = m.rollouts()[mode].exposure_gap
    return gap.j[-1], gap.gap.mean[-1], gap.own_prefix_loss[-1], gap.true_prefix_loss[-1]


GAP_READING = (
    "A small gap with a high loss after the true tokens is a model that makes little use of its context "
    "(its own text costs it little because the true text helped it little), not one robust to its own "
    "errors: compare gaps between models of similar loss after the true tokens."
)


def one_line(name: str, m: ModelResult) -> str:
    """The line printed when a model is done: every teacher-forced figure with its token count."""
    tf, g = m.teacher_forced, m.greedy
    leaky = "" if m.leaky is None else f" (causal view; leaky view, as trained: {m.leaky.val_loss:.4f})"
    j, gap, own, true = gap_at_end(m)
    return (
        f"{name}: val loss {tf.val_loss:.4f}{leaky}, bpb {tf.bits_per_byte:.4f}, top-1 {tf.top1_acc:.3f} "
        f"(teacher-forced, {tokens(tf.val_tokens)} of val); greedy: "
        f"first wrong token at k = {g.first_divergence_mean.mean:.2f} (median {g.first_divergence_median.mean:.0f}), "
        f"half-life {g.half_life}, WER {g.wer.mean:.3f}; exposure gap at j = {j}: {gap:+.3f} "
        f"(loss {own:.3f} after its own tokens, {true:.3f} after the true ones)"
    )


def gap_note(results: dict[str, ModelResult]) -> str | None:
    """Where the smallest greedy gap belongs to a model with a higher loss after the true tokens than the
    model with the largest gap: why the order reads backwards. None otherwise."""
    if len(results) < 2:
        return None
    order = sorted(results, key=lambda name: gap_at_end(results[name])[1])
    small, large = order[0], order[-1]
    _, small_gap, _, small_true = gap_at_end(results[small])
    _, large_gap, _, large_true = gap_at_end(results[large])
    if small_true <= large_true or small_gap >= large_gap:
        return None
    return (
        f"**{small}**'s exposure gap ({small_gap:+.3f}) is smaller than **{large}**'s ({large_gap:+.3f}), but its "
        f"loss after the true tokens is higher ({small_true:.3f} against {large_true:.3f} nats/token): "
        f"{small} gains less from the true context, so its own text costs it less. The smaller gap does not "
        "mean it copes better with its own errors."
    )


def summary_lines(results: dict[str, ModelResult]) -> list[str]:
    """Printed after every model is done: how to read the exposure gaps (and why their order may read backwards)."""
    note = gap_note(results)
    lines = [
        "exposure gap: loss on the next true tokens after the model's own tokens minus after the true ones; "
        "small gap + high loss after the true tokens = a model that ignores its context, not one robust to its own errors"
    ]
    return lines + ([note.replace("**", "")] if note else [])


# --------------------------------------------------------------------------------------------------
# The answer
# --------------------------------------------------------------------------------------------------


def _verdict(s: Interval[float], pk: Interval[float]) -> str:
    if s.low > pk.high:
        return "above it: errors cluster, the prompts a model gets right it tends to keep getting right"
    if s.high < pk.low:
        return "below it: one error makes the next likelier even before the context goes wrong"
    return "consistent with independent errors"


def _soonest(early_name: str, early: RolloutResult, late_name: str, late: RolloutResult) -> str:
    early_k, late_k = early.first_divergence_mean, late.first_divergence_mean
    ratio = late_k.mean / max(early_k.mean, 1e-9)
    apart = early_k.high < late_k.low
    return (
        f"**{early_name}** drifts soonest: its greedy continuations make their first wrong token at "
        f"k = {early_k.mean:.1f} on average, against k = {late_k.mean:.1f} "
        f"for **{late_name}**, which stays on the reference {ratio:.1f}x as long"
        + ("." if apart else " (but their 95% intervals overlap: no clear difference on these prompts).")
    )


def _drift(name: str, m: ModelResult) -> str:
    g = m.greedy
    a, n = g.accuracy_by_position.mean, len(g.accuracy_by_position.mean)
    when = (
        f"half of its continuations have left the reference by k = {g.half_life}"
        if g.half_life
        else f"over half still match after all {n} tokens"
    )
    k = comparison_k(m)
    s, pk = survival_at(m, k)
    scored = m.reference.prompts * n
    return (
        f"**{name}**: right on {pct(m.reference.teacher_forced_accuracy.mean)} of next tokens under teacher forcing "
        f"(the {tokens(scored)} of the prompts' true continuations), "
        f"but its greedy continuations are right on {pct(a[0])} at k = 1, {pct(float(np.mean(a)))} on average over "
        f"k = 1..{n} and {pct(a[-1])} at k = {n}. First wrong token at k = "
        f"{fmt_ci(g.first_divergence_mean, 1)} (median "
        f"{fmt(g.first_divergence_median.mean, 0)}); {when}; WER {fmt(g.wer.mean, 2)}. Independent errors would give "
        f"S({k}) = p^{k} = {pct(pk.mean)}; measured S({k}) = {pct(s.mean)} [{pct(s.low)}, {pct(s.high)}], "
        f"{_verdict(s, pk)}."
    )


def headline(results: dict[str, ModelResult]) -> list[str]:
    """The report's first bullets: who drifts sooner and by how much, then why."""
    order = sorted(results, key=lambda name: results[name].greedy.first_divergence_mean.mean)
    lines = []
    if len(order) > 1:
        lines.append(_soonest(order[0], results[order[0]].greedy, order[-1], results[order[-1]].greedy))
    lines += [_drift(name, results[name]) for name in order]
    for name in order:
        gap = results[name].greedy.exposure_gap
        lines.append(
            f"Exposure bias, **{name}**: after its own first {gap.j[-1]} tokens, its loss on the next "
            f"{gap.horizon} true tokens is {gap.gap.mean[-1]:+.3f} nats/token [{gap.gap.low[-1]:+.3f}, "
            f"{gap.gap.high[-1]:+.3f}] compared with after the true prefix ({gap.own_prefix_loss[-1]:.3f} after "
            f"its own tokens against {gap.true_prefix_loss[-1]:.3f} after the true ones)."
        )
    note = gap_note(results)
    lines += [note] if note else []
    for name in order:
        judge = results[name].greedy.judge
        if judge and judge.teacher != name:  # the judge agrees with itself trivially
            lines.append(
                f"Judge **{judge.teacher}** on **{name}**: {judge.nll.mean:.3f} nats/token for its greedy continuations "
                f"(the true ones: {judge.nll_reference.mean:.3f}); top-1 agreement {pct(judge.agreement_rollout.mean)} "
                f"along its own rollouts vs {pct(judge.agreement_data.mean)} along the data."
            )
    return lines


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _tokens_note(results: dict[str, ModelResult]) -> str:
    """On how many val tokens the teacher-forced metrics were measured (one count: every model has the same windows)."""
    counts = sorted({int(m.teacher_forced.val_tokens) for m in results.values()})
    said = " / ".join(f"{n:,}" for n in counts)
    return f"val loss, bits/byte and top-1 on {said} val tokens (`--eval-tokens`)"


def _glance(results: dict[str, ModelResult]) -> str:
    rows = [
        [
            f"**{name}**",
            m.kind,
            fmt(m.parameters),
            fmt(m.teacher_forced.val_loss),
            fmt(m.teacher_forced.bits_per_byte),
            pct(m.teacher_forced.top1_acc),
            fmt(m.greedy.half_life),
            fmt_ci(m.greedy.first_divergence_mean, 2),
            fmt(m.greedy.first_divergence_median.mean, 1),
            fmt_ci(m.greedy.wer, 3),
            fmt_ci(m.greedy.cer, 3),
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


def _survival_table(results: dict[str, ModelResult]) -> str:
    n = len(next(iter(results.values())).greedy.survival_by_position.mean)
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    rows = []
    for name, m in results.items():
        cells = []
        for k in ks:
            s, pk = survival_at(m, k)
            cells.append(f"{pct(s.mean)} / {pct(pk.mean)}")
        rows.append([f"**{name}**", fmt(m.reference.teacher_forced_accuracy.mean, 3), *cells])
    return table(["model", "p", *[f"S({k}) / p^{k}" for k in ks]], rows)


def _rollout_table(results: dict[str, ModelResult]) -> str:
    rows = []
    for name, m in results.items():
        for mode, r in m.rollouts().items():
            acc = r.accuracy_by_position.mean
            rows.append(
                [
                    f"**{name}**",
                    mode,
                    pct(acc[0]),
                    pct(acc[-1]),
                    pct(float(np.mean(acc))),
                    fmt_ci(r.first_divergence_mean, 2),
                    fmt(r.half_life),
                    pct(r.diverged_fraction),
                    fmt_ci(r.wer, 3),
                    fmt_ci(r.cer, 3),
                ]
            )
    n = len(next(iter(results.values())).greedy.accuracy_by_position.mean)
    header = ["model", "rollout", "a(1)", f"a({n})", "mean a(k)", "first wrong token", "half-life"]
    return table([*header, f"diverged within {n}", "WER", "CER"], rows)


def _gap_table(results: dict[str, ModelResult]) -> str:
    first = next(iter(results.values())).greedy.exposure_gap
    js, last = first.j, first.j[-1]
    rows = []
    for name, m in results.items():
        for mode, r in m.rollouts().items():
            gap = r.exposure_gap
            losses = [fmt(gap.true_prefix_loss[-1]), fmt(gap.own_prefix_loss[-1])]
            rows.append([f"**{name}**", mode, *[f"{g:+.3f}" for g in gap.gap.mean], *losses])
    header = ["model", "rollout", *[f"gap j = {j}" for j in js]]
    return table(
        [*header, f"loss after the true tokens (j = {last})", f"loss after its own tokens (j = {last})"], rows
    )


def _judge_table(results: dict[str, ModelResult]) -> str | None:
    rows = [
        [
            f"**{name}**",
            mode,
            fmt_ci(r.judge.nll),
            fmt_ci(r.judge.nll_reference),
            fmt_ci(r.judge.agreement_rollout),
            fmt_ci(r.judge.agreement_data),
        ]
        for name, m in results.items()
        for mode, r in m.rollouts().items()
        if r.judge
    ]
    if not rows:
        return None
    header = ["model", "rollout", "judge NLL of its continuation", "judge NLL of the true one"]
    return table([*header, "top-1 agreement along its rollout", "along the data"], rows)


def _degeneration_table(results: dict[str, ModelResult]) -> str:
    rows = []
    for name, m in results.items():
        for mode, r in m.rollouts().items():
            d = r.degeneration
            rows.append(
                [
                    f"**{name}**",
                    mode,
                    fmt_ci(d.repetition_rate),
                    fmt(d.distinct_1.mean),
                    fmt(d.distinct_2.mean),
                    f"{pct(d.looping.mean)} [{pct(d.looping.low)}, {pct(d.looping.high)}]",
                ]
            )
    header = ["model", "rollout", "repetition rate (4-grams)", "distinct-1", "distinct-2", "ends in a loop"]
    return table(header, rows)


def _confidence_table(results: dict[str, ModelResult]) -> str:
    rows = []
    for name, m in results.items():
        for mode, c in m.confidence.items():
            ent, top = c.entropy.mean, c.max_prob.mean
            cells = [fmt(ent[0]), fmt(ent[-1]), fmt(float(np.mean(ent)))]
            cells += [fmt(top[0]), fmt(top[-1]), fmt(float(np.mean(top)))]
            rows.append([f"**{name}**", mode, *cells])
    n = len(next(iter(results.values())).greedy.accuracy_by_position.mean)
    header = ["model", "rollout", "entropy k = 1", f"entropy k = {n}", "mean entropy"]
    return table([*header, "max-prob k = 1", f"max-prob k = {n}", "mean max-prob"], rows)


def _positions_table(results: dict[str, ModelResult]) -> str:
    rows = []
    for name, m in results.items():
        lp = m.loss_by_position
        for b in lp.buckets if lp is not None else []:
            mark = "past the trained context" if b.past_trained_context else ""
            span = f"{b.start}" if b.end == b.start + 1 else f"{b.start}–{b.end - 1}"
            rows.append([f"**{name}**", span, fmt(b.loss), fmt(b.tokens), mark])
    return table(["model", "positions t", "loss (nats)", "predictions", "t >= trained max_seq_len"], rows)


def _positions_lines(results: dict[str, ModelResult], plots: dict[str, str]) -> list[str]:
    measured = {name: m.loss_by_position for name, m in results.items() if m.loss_by_position is not None}
    if not measured:
        return []
    contexts = ", ".join(f"{name} {lp.trained_max_seq_len}" for name, lp in measured.items())
    seq_len = next(iter(measured.values())).seq_len
    return [
        "## Loss by position",
        "",
        f"Teacher-forced loss (causal view) at each position t of val windows of {seq_len} tokens, in buckets "
        f"at powers of two, split at each model's trained max_seq_len ({contexts}). Falling loss: the model "
        "uses more context; past the trained max_seq_len (length extrapolation): does it hold?",
        "",
        _positions_table(results),
        "",
        f"![loss by position]({plots['loss_by_position']})",
        "",
    ]


def _teacher_forced_table(results: dict[str, ModelResult]) -> str:
    rows = []
    leaky = any(m.leaky is not None for m in results.values())
    for name, m in results.items():
        views = [("causal (mask on)", m.teacher_forced)]
        if m.leaky is not None:
            views.append(("leaky (mask off, as trained)", m.leaky))
        rows += [_teacher_forced_row(name, tf, view if leaky else None) for view, tf in views]
    header = ["model", *(["view"] if leaky else []), "val loss (nats)", "perplexity", "bits/byte"]
    return table([*header, "top-1", "top-5", "ECE", "val tokens"], rows)


def _teacher_forced_row(name: str, tf: TeacherForced, view: str | None) -> list[str]:
    return [
        f"**{name}**",
        *([view] if view is not None else []),
        fmt(tf.val_loss),
        fmt(tf.val_ppl, 2),
        fmt(tf.bits_per_byte),
        pct(tf.top1_acc),
        pct(tf.top5_acc),
        fmt(tf.ece),
        fmt(int(tf.val_tokens)),
    ]


def _leaky_lines(results: dict[str, ModelResult]) -> list[str]:
    leaky = [name for name, m in results.items() if m.leaky is not None]
    if not leaky:
        return []
    names = ", ".join(f"**{name}**" for name in leaky)
    return [
        f"{names} trained without the causal mask. Its teacher-forced metrics are given twice: the **leaky** "
        "view, as trained (mask off: each position also sees the token it predicts, so its loss is not a "
        "language-model loss), and the **causal** view (mask on: the honest one, used everywhere else in this "
        "report). Rollouts are causal by construction: a generated token can only see the tokens before it.",
        "",
    ]


def _attention_table(results: dict[str, ModelResult]) -> str:
    rows = []
    for name, m in results.items():
        ent = np.asarray(m.attention.entropy)
        collapsed = ", ".join(f"L{layer} H{head}" for layer, head in m.attention.collapsed) or "none"
        rows.append(
            [
                f"**{name}**",
                f"{ent.shape[0]} x {ent.shape[1]}",
                f"{ent.min():.2f} – {ent.max():.2f}",
                f"{np.max(m.attention.max_prob):.2f}",
                collapsed,
            ]
        )
    threshold = next(iter(results.values())).attention.collapse_threshold
    header = ["model", "layers x heads", "entropy (nats)", "largest mean max-prob"]
    return table([*header, f"collapsed (max-prob > {threshold})"], rows)


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------

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
  j tokens] minus after [prompt, the first j true tokens]; 0 at j = 0. A model that ignores its
  context has a small gap and a high loss after the true tokens.
* **Rollouts**: greedy (the most likely id each step), sampled, nucleus (sampling among the fewest ids
  holding top-p of the probability), beam (the most likely continuation under a beam of width W).
* **Entropy / max-probability along a rollout**: of the model's own next-token distribution over
  vocabulary ids at temperature 1, at each generated position k (the distribution token k came from).
* **Loss by position**: teacher-forced NLL of the prediction at window position t (from t + 1 tokens
  of context); buckets at powers of two, split at the trained max_seq_len.
* **Judge**: a teacher's NLL of a model's continuation, and how often judge and model agree on the
  most likely next token along the model's rollout versus along the data.
* **Repetition rate**: share of 4-grams already seen earlier in the continuation; **distinct-n**:
  distinct n-grams / n-grams; **ends in a loop**: the continuation ends in at least 3 repeats of a
  period (and at least 8 tokens).
* **Collapsed head**: mean max attention probability above the threshold (attends to one token).
* A reference token outside a compact model's kept ids never counts as matched. Brackets: 95%
  bootstrap intervals over prompts. Losses are nats per token over the full vocabulary.
"""


def _samples_markdown(results: dict[str, ModelResult]) -> list[str]:
    first = next(iter(results.values()))
    out = []
    for s, sample in enumerate(first.samples):
        out += [f"**Prompt {s + 1}**", "", "```", sample.prompt, "```", ""]
        out += ["True continuation:", "", "```", sample.reference, "```", ""]
        for name, m in results.items():
            for mode, c in m.samples[s].continuations.items():
                out += [
                    f"{name}, {mode} (first {c.diverge_char} characters match):",
                    "",
                    "```",
                    c.text,
                    "```",
                    "",
                ]
    return out


def _modes_text(context: Context) -> str:
    """How the rollouts were decoded, in words."""
    words = {
        "greedy": "greedily",
        "sampled": f"by sampling (temperature {context.temperature}, top-k {context.top_k or 'off'}, "
        f"top-p {context.top_p})",
        "nucleus": f"by nucleus sampling (top-p {context.nucleus}, temperature {context.temperature})",
        "beam": f"by beam search ({context.beam_width} beams)",
    }
    said = [words[mode] for mode in context.rollouts]
    return said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]


def _introduction(results: dict[str, ModelResult], context: Context) -> list[str]:
    return [
        "# Compounding errors: " + ", ".join(results),
        "",
        f"Val split of `{context.data}`: {context.prompts} prompts of {context.prompt_tokens} tokens at "
        f"seeded positions (seed {context.seed}); each model continues every prompt by {context.new_tokens} "
        f"tokens {_modes_text(context)}, compared with the true continuation. "
        "Brackets: 95% bootstrap intervals over prompts.",
        "",
        "## The answer",
        "",
        *[f"* {line}" for line in headline(results)],
        "",
    ]


def _drift_sections(results: dict[str, ModelResult], plots: dict[str, str]) -> list[str]:
    note = gap_note(results)
    return [
        "## At a glance (greedy rollouts)",
        "",
        f"Teacher-forced columns: {_tokens_note(results)}.",
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
        "## Rollouts: " + ", ".join(next(iter(results.values())).rollouts()),
        "",
        _rollout_table(results),
        "",
        "## Confidence along the rollouts",
        "",
        "Entropy and max-probability of each model's own next-token distribution (temperature 1) at each "
        "generated position, mean over prompts. A continuation falling into a loop shows as entropy collapsing "
        "and max-probability rising.",
        "",
        _confidence_table(results),
        "",
        f"![confidence along the rollouts]({plots['rollout_confidence']})",
        "",
        "## Exposure bias",
        "",
        "Extra loss (nats/token) on the true continuation after j tokens of the model's own text instead of the "
        "true text, and at the largest j the two losses it is the difference of:",
        "",
        _gap_table(results),
        "",
        f"How to read the gap: it is how much worse a model predicts the true text when its context holds its own "
        f"text instead. {GAP_READING}",
        "",
        *([note, ""] if note else []),
        f"![exposure-bias gap]({plots['exposure_gap']})",
        "",
    ]


def _model_sections(results: dict[str, ModelResult], context: Context, plots: dict[str, str]) -> list[str]:
    judge = _judge_table(results)
    lines = ["## Teacher as judge", "", f"Judge: {context.judge} ({context.judge_rule}).", "", judge, ""]
    return (lines if judge else []) + [
        "## Degeneration",
        "",
        _degeneration_table(results),
        "",
        "## Teacher-forced metrics",
        "",
        f"On a fixed set of val windows of {context.seq_len} tokens, the same for every model: "
        f"{_tokens_note(results)}.",
        "",
        *_leaky_lines(results),
        _teacher_forced_table(results),
        "",
        *_positions_lines(results, plots),
        "## Attention",
        "",
        _attention_table(results),
        "",
        f"![attention entropy]({plots['attention_entropy']})",
        "",
        f"![attention maps]({plots['attention_maps']})",
        "",
    ]


def markdown(results: dict[str, ModelResult], context: Context, plots: dict[str, str]) -> str:
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
