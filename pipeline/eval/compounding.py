"""How a model's errors compound when it feeds on its own output (exercise H10.5).

M prompts of P tokens are cut from the val split at seeded positions, each with its true
continuation of N tokens. Every model continues every prompt in each mode of --rollouts (greedy,
sampled, nucleus top-p, beam search); the per-prompt results (`measure_model`) are gathered over
processes and summarised with bootstrap intervals (`summarize`). Definitions of the metrics are in `pipeline.eval.metrics`; here:

* teacher-forced accuracy p: top-1 accuracy on the same N reference tokens, each predicted from the
  true prefix; S(k) is set against p^k.
* exposure-bias gap at prefix length j: the model's mean NLL of the next `horizon` reference tokens
  after [prompt, its own first j generated tokens] minus after [prompt, the first j true tokens].
  Zero at j = 0; it grows when the model is worse at continuing from its own text than from data.
* teacher as judge: the judge's NLL of a model's continuation (lower: text the teacher finds
  likely), and how often the judge's and the model's top-1 next-token predictions agree along the
  model's own rollout versus along the data.
* confidence along a rollout: entropy and max-probability of the model's own next-token
  distribution (temperature 1, over vocabulary ids) at each generated position (exercise H9.4: a
  loop shows as entropy collapsing and max-probability rising).
* loss by position (`position_nll`): teacher-forced NLL at each position of the val windows, the
  window possibly longer than the model's max_seq_len (length extrapolation, exercise H6.3).

Sequences longer than a model's max_seq_len are scored in overlapping windows (every prediction
keeps at least half a window of context); generation slides its window (see pipeline.model.generation).
All NLLs are full-vocabulary nats, as in `pipeline.eval.teacher_forced`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.config import SamplingConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.eval import metrics
from pipeline.eval.config import EvaluateConfig
from pipeline.eval.results import (
    Compounding,
    Confidence,
    Continuation,
    Degeneration,
    ExposureGap,
    Interval,
    Judge,
    LossByPosition,
    PositionBucket,
    Reference,
    RolloutResult,
    Sample,
)
from pipeline.model.generation import generate, to_text
from pipeline.model.gpt import GPT
from pipeline.run.checkpoint import Export
from pipeline.train.losses import chunked_logits, token_stats

# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """M windows of the val split: P prompt tokens followed by the N-token true continuation."""

    starts: np.ndarray  # (M,) offsets in the val split
    ids: np.ndarray  # (M, P + N) vocabulary ids
    prompt_tokens: int
    new_tokens: int

    def __len__(self) -> int:
        return len(self.starts)


def sample_prompts(
    val: np.ndarray, n_prompts: int, prompt_tokens: int, new_tokens: int, seed: int
) -> Prompts:
    """Up to n_prompts distinct, seeded positions of the val split (sorted)."""
    span = prompt_tokens + new_tokens
    positions = len(val) - span + 1
    if positions < 1:
        raise UsageError(
            f"the val split has {len(val):,} tokens, fewer than --prompt-tokens + --new-tokens = {span}; "
            f"lower them or tokenize a larger corpus"
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(positions, size=min(n_prompts, positions), replace=False))
    ids = np.stack([np.asarray(val[s : s + span], dtype=np.int64) for s in starts])
    return Prompts(starts, ids, prompt_tokens, new_tokens)


# --------------------------------------------------------------------------------------------------
# Scoring sequences
# --------------------------------------------------------------------------------------------------


def score_windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """(first token, first prediction, end prediction) of windows of at most `window` tokens that
    score each prediction 0..n_tokens-2 (prediction i: token i+1 from tokens <= i) exactly once, each
    with at least window/2 tokens of context (or all of them)."""
    if n_tokens <= window:
        return [(0, 0, n_tokens - 1)]
    out, done, stride = [(0, 0, window - 1)], window - 1, max(window // 2, 1)
    while done < n_tokens - 1:
        end = min(done + stride, n_tokens - 1)
        out.append((end + 1 - window, done, end))
        done = end
    return out


def _nll_top1_head(targets: Tensor, vocab: VocabMap, first: int, end: int):
    """head_fn: full-vocabulary NLL and top-1 class (ranking ids) of window positions first..end-1."""

    def head(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        h = hidden[:, first:end]
        B, T, C = h.shape
        h, t = h.reshape(-1, C), targets.reshape(-1)
        nll = torch.empty(t.shape, dtype=torch.float32, device=h.device)
        top = torch.empty(t.shape, dtype=torch.long, device=h.device)
        for rows, logits in chunked_logits(h, weight):
            logp = logits.log_softmax(dim=-1)
            nll[rows] = -logp.gather(1, t[rows, None]).squeeze(1)
            if vocab.compact:
                logp[:, vocab.other] -= vocab.log_unseen
            top[rows] = logp.argmax(dim=-1)
        if vocab.compact:
            nll = nll + (t == vocab.other).float() * vocab.log_unseen
        return nll.view(B, T), top.view(B, T)

    return head


def _confidence_head(vocab: VocabMap, first: int, end: int):
    """head_fn: entropy (nats) and max-probability over vocabulary ids at window positions first..end-1."""

    def head(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        h = hidden[:, first:end]
        B, T, C = h.shape
        h = h.reshape(-1, C)
        entropy = torch.empty(len(h), dtype=torch.float32, device=h.device)
        top = torch.empty(len(h), dtype=torch.float32, device=h.device)
        for rows, logits in chunked_logits(h, weight):
            logp = logits.float().log_softmax(dim=-1)
            ent = -(logp.exp() * logp).sum(dim=-1)
            if vocab.compact:  # `other` spreads its mass over V - K unseen ids
                ent = ent + logp[:, vocab.other].exp() * vocab.log_unseen
                logp[:, vocab.other] -= vocab.log_unseen
            entropy[rows], top[rows] = ent, logp.max(dim=-1).values.exp()
        return entropy.view(B, T), top.view(B, T)

    return head


def _over_windows(model: GPT, seqs: Tensor, make_head, batch_size: int, last: int | None):
    """Two (B, L - 1) tensors of per-prediction values (or the last `last`), from head_fns
    make_head(targets, first, end) run over the scoring windows of `score_windows`."""
    L, window = seqs.shape[1], model.cfg.max_seq_len
    if last is None:
        windows = score_windows(L, window)
    else:
        windows = [(max(0, L - window), L - 1 - last, L - 1)]
    parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    for start, first, end in windows:
        x = seqs[:, start : start + window]
        targets = seqs[:, first + 1 : end + 1]
        outs: tuple[list[Tensor], list[Tensor]] = ([], [])
        for i in range(0, len(seqs), batch_size):
            head = make_head(targets[i : i + batch_size], first - start, end - start)
            for out, value in zip(outs, model(x[i : i + batch_size], head_fn=head)):
                out.append(value)
        for part, out in zip(parts, outs):
            part.append(torch.cat(out))
    return torch.cat(parts[0], dim=1), torch.cat(parts[1], dim=1)


@torch.no_grad()
def score_tokens(
    model: GPT, seqs: Tensor, vocab: VocabMap, batch_size: int = 32, last: int | None = None
) -> tuple[Tensor, Tensor]:
    """Teacher-forced (B, L) class ids -> NLL and top-1 class of each next token, (B, L - 1) each.

    With `last`, only the last `last` predictions, from one window ending at the sequence's end.
    """

    def make_head(targets: Tensor, first: int, end: int):
        return _nll_top1_head(targets, vocab, first, end)

    return _over_windows(model, seqs, make_head, batch_size, last)


@torch.no_grad()
def rollout_confidence(
    model: GPT, prompts: Tensor, generated: Tensor, vocab: VocabMap, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Entropy and max-probability of the model's next-token distribution at each generated position
    (the distribution token k was drawn from, at temperature 1): two (M, N) arrays."""
    seqs = torch.cat((prompts, generated), dim=1)
    P = prompts.shape[1]

    def make_head(targets: Tensor, first: int, end: int):
        return _confidence_head(vocab, first, end)

    entropy, top = _over_windows(model, seqs, make_head, batch_size, None)
    return entropy[:, P - 1 :].cpu().numpy(), top[:, P - 1 :].cpu().numpy()


@torch.no_grad()
def position_nll(
    model: GPT, batches: list[tuple[Tensor, Tensor]], vocab: VocabMap, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Summed teacher-forced NLL and token count at each window position over `batches` of (x, y)
    windows of one length T (longer than max_seq_len where the positions allow): (T,) each, float64."""
    T = batches[0][0].shape[1] if batches else 0
    sums = torch.zeros(T, dtype=torch.float64, device=device)
    counts = torch.zeros(T, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)

        def head(hidden: Tensor, weight: Tensor, y: Tensor = y) -> Tensor:
            return token_stats(hidden, weight, y, vocab.other, vocab.log_unseen)[0]

        nll = model(x, head_fn=head).view(x.shape)  # (B, T)
        sums += nll.double().sum(dim=0)
        counts += len(x)
    return sums, counts


def summarize_positions(sums: np.ndarray, counts: np.ndarray, trained_max_seq_len: int) -> LossByPosition:
    """Per-position NLL sums and counts (from `position_nll`, reduced over processes) -> the curve and
    its buckets (powers of two, split at the trained max_seq_len)."""
    seq_len = len(sums)
    buckets = metrics.position_buckets(seq_len, trained_max_seq_len)
    means = metrics.bucket_means(sums, counts, buckets)
    return LossByPosition(
        seq_len=seq_len,
        trained_max_seq_len=trained_max_seq_len,
        per_position=(sums / np.maximum(counts, 1.0)).tolist(),
        buckets=[
            PositionBucket(start, end, loss, n, start >= trained_max_seq_len)
            for (start, end), (loss, n) in zip(buckets, means)
        ],
    )


# --------------------------------------------------------------------------------------------------
# Rollouts, exposure bias, judge
# --------------------------------------------------------------------------------------------------


def rollout(
    model: GPT,
    prompts: Tensor,
    new_tokens: int,
    sampling: SamplingConfig,
    vocab: VocabMap,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
) -> Tensor:
    """(M, P) prompts -> (M, new_tokens) generated class ids."""
    cfg = dataclasses.replace(sampling, max_new_tokens=new_tokens)
    P = prompts.shape[1]
    parts = [
        generate(model, prompts[i : i + batch_size], cfg, generator, vocab=vocab)[:, P:]
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(parts)


def gap_positions(new_tokens: int, horizon: int) -> list[int]:
    """Prefix lengths j of the exposure-bias gap: 0, 1, 2, 4, ... and the last one, new_tokens - horizon."""
    last = new_tokens - horizon
    js = [0] + [2**i for i in range(max(last, 1).bit_length()) if 2**i < last] + [last]
    return sorted(set(js))


@torch.no_grad()
def exposure_gap(
    model: GPT,
    prompts: Tensor,
    generated: Tensor,
    reference: Tensor,
    vocab: VocabMap,
    horizon: int,
    positions: list[int],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt mean NLL of reference[j : j + horizon] after the model's own prefix and after the true
    one, for each j in `positions`: two (M, J) arrays."""
    own, true = [], []
    for j in positions:
        target = reference[:, j : j + horizon]
        own_seq = torch.cat((prompts, generated[:, :j], target), dim=1)
        true_seq = torch.cat((prompts, reference[:, :j], target), dim=1)
        own.append(score_tokens(model, own_seq, vocab, batch_size, last=horizon)[0].mean(dim=1))
        true.append(score_tokens(model, true_seq, vocab, batch_size, last=horizon)[0].mean(dim=1))
    return torch.stack(own, 1).cpu().numpy(), torch.stack(true, 1).cpu().numpy()


@torch.no_grad()
def judge_scores(
    judge: GPT, model: GPT, prompts: Tensor, continuation: Tensor, vocab: VocabMap, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Judge's mean NLL of `continuation` after `prompts`, and the share of its positions where judge
    and model agree on the top-1 next token: (M,) each."""
    seqs = torch.cat((prompts, continuation), dim=1)
    P = prompts.shape[1]
    judge_nll, judge_top = score_tokens(judge, seqs, vocab, batch_size)
    _, model_top = score_tokens(model, seqs, vocab, batch_size)
    agree = (judge_top[:, P - 1 :] == model_top[:, P - 1 :]).float().mean(dim=1)
    return judge_nll[:, P - 1 :].mean(dim=1).cpu().numpy(), agree.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# One model, per prompt
# --------------------------------------------------------------------------------------------------


def rollout_configs(cfg: EvaluateConfig) -> dict[str, SamplingConfig]:
    """The rollouts every model runs, in the order greedy, sampled, nucleus, beam: those of --rollouts,
    less sampled under --no-sampled."""
    configs = {
        "greedy": SamplingConfig(temperature=0.0),
        "sampled": SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p),
        "nucleus": SamplingConfig(temperature=cfg.temperature, top_p=cfg.nucleus),
        "beam": SamplingConfig(temperature=0.0, num_beams=cfg.beam_width),
    }
    wanted = set(cfg.rollouts) - (set() if cfg.sampled else {"sampled"})
    return {mode: sampling for mode, sampling in configs.items() if mode in wanted}


def phases(cfg: EvaluateConfig, judged: bool) -> list[str]:
    """What evaluating one model runs, in order (the progress bar's steps): teacher-forced metrics, each
    rollout mode (generation, exposure gap, confidence) and, with a judge, its verdict, then attention."""
    out = ["teacher-forced"]
    for mode in rollout_configs(cfg):
        out += [f"{mode} rollouts", *([f"judge on {mode}"] if judged else [])]
    return [*out, "attention"]


@torch.no_grad()
def measure_model(
    model: GPT,
    vocab: VocabMap,
    tokenizer: Tokenizer,
    prompts: Prompts,
    index: np.ndarray,
    cfg: EvaluateConfig,
    device: torch.device,
    judge: GPT | None = None,
    tick: Callable[[str], None] = lambda phase: None,
) -> dict[str, Any]:
    """Per-prompt results of the prompts `index` (this process's share), as flat arrays and lists.

    `tick(phase)` is called as each phase of `phases` after "teacher-forced" starts (the caller
    ticks "teacher-forced" and "attention")."""
    P, N, bs = prompts.prompt_tokens, prompts.new_tokens, cfg.batch_size
    ids = prompts.ids[index]
    cls = torch.as_tensor(vocab.to_compact(ids), device=device)
    prompt_cls, ref_cls = cls[:, :P], cls[:, P:]
    tf_nll, tf_top = score_tokens(model, cls, vocab, bs)
    out: dict[str, Any] = {
        "index": np.asarray(index),
        "tf_nll": tf_nll[:, P - 1 :].cpu().numpy(),
        "tf_matches": metrics.token_matches(
            tf_top[:, P - 1 :].cpu().numpy(), ref_cls.cpu().numpy(), vocab.other
        ),
        "prompt_text": [tokenizer.decode(row[:P]) for row in ids],
        "reference_text": [tokenizer.decode(row[P:]) for row in ids],
    }
    if judge is not None:
        nll, agree = judge_scores(judge, model, prompt_cls, ref_cls, vocab, bs)
        out |= {"judge_nll_reference": nll, "agreement_data": agree}
    positions = gap_positions(N, cfg.gap_horizon)
    for mode, sampling in rollout_configs(cfg).items():
        tick(f"{mode} rollouts")
        # Seeded by the share's first prompt: sampled rollouts depend on how prompts split over processes.
        generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + int(index[0]))
        gen = rollout(model, prompt_cls, N, sampling, vocab, generator, bs)
        gap_own, gap_true = exposure_gap(
            model, prompt_cls, gen, ref_cls, vocab, cfg.gap_horizon, positions, bs
        )
        texts = _continuation_texts(gen, ids, P, tokenizer, vocab, cfg.seed)
        entropy, max_prob = rollout_confidence(model, prompt_cls, gen, vocab, bs)
        gen_np = gen.cpu().numpy()
        out |= {
            f"{mode}.entropy": entropy,
            f"{mode}.max_prob": max_prob,
            f"{mode}.generated": gen_np,
            f"{mode}.matches": metrics.token_matches(gen_np, ref_cls.cpu().numpy(), vocab.other),
            f"{mode}.gap_own": gap_own,
            f"{mode}.gap_true": gap_true,
            **{f"{mode}.{k}": v for k, v in texts.items()},
            **{f"{mode}.{k}": v for k, v in metrics.degeneration(gen_np.tolist()).items()},
        }
        if judge is not None:
            tick(f"judge on {mode}")
            nll, agree = judge_scores(judge, model, prompt_cls, gen, vocab, bs)
            out |= {f"{mode}.judge_nll": nll, f"{mode}.agreement_rollout": agree}
    return out


def _continuation_texts(
    generated: Tensor, ids: np.ndarray, P: int, tokenizer: Tokenizer, vocab: VocabMap, seed: int
) -> dict[str, Any]:
    """Generated texts, their WER and CER against the reference, and where (in characters) they diverge."""
    generator = torch.Generator().manual_seed(seed)
    texts = [to_text(row, tokenizer, vocab, generator) for row in generated.cpu()]
    references = [tokenizer.decode(row[P:]) for row in ids]
    first = metrics.first_divergence(
        metrics.token_matches(generated.cpu().numpy(), vocab.to_compact(ids[:, P:]), vocab.other)
    )
    return {
        "text": texts,
        "wer": np.array([metrics.word_error_rate(h, r) for h, r in zip(texts, references)]),
        "cer": np.array([metrics.char_error_rate(h, r) for h, r in zip(texts, references)]),
        "diverge_char": [len(tokenizer.decode(row[P : P + k - 1])) for row, k in zip(ids, first)],
    }


# --------------------------------------------------------------------------------------------------
# Gathering and summarising
# --------------------------------------------------------------------------------------------------


def merge_shares(shares: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-process results (each from `measure_model`) joined and put back in prompt order."""
    merged: dict[str, Any] = {}
    for key in shares[0]:
        parts = [share[key] for share in shares]
        if isinstance(parts[0], np.ndarray):
            merged[key] = np.concatenate(parts)
        else:
            merged[key] = [item for part in parts for item in part]
    order = np.argsort(merged["index"], kind="stable")
    return {k: v[order] if isinstance(v, np.ndarray) else [v[i] for i in order] for k, v in merged.items()}


def _interval(values: np.ndarray, cfg: EvaluateConfig) -> Interval:
    """The mean over prompts (axis 0) and its bootstrap 95% interval."""
    summary = metrics.mean_ci(values, cfg.bootstrap, cfg.seed)
    return Interval(summary["mean"], *summary["ci"])


def summarize(results: dict[str, Any], cfg: EvaluateConfig, judge_name: str | None = None) -> Compounding:
    """Per-prompt results (merged over processes) -> the reference scores, rollouts and samples of one model."""
    tf = np.asarray(results["tf_matches"], dtype=np.float64)  # (M, N)
    k = np.arange(1, tf.shape[1] + 1)
    low, high = metrics.bootstrap_ci(tf, stat=lambda v: v.mean() ** k, n_boot=cfg.bootstrap, seed=cfg.seed)
    reference = Reference(
        prompts=len(tf),
        teacher_forced_loss=float(results["tf_nll"].mean()),
        teacher_forced_accuracy=_interval(tf.mean(axis=1), cfg),
        teacher_forced_accuracy_by_position=metrics.accuracy_by_position(tf).tolist(),
        independence_prediction=Interval(
            metrics.independence_prediction(tf.mean(), tf.shape[1]).tolist(), low.tolist(), high.tolist()
        ),
    )
    modes = list(rollout_configs(cfg))
    rollouts = {mode: _summarize_rollout(results, mode, cfg, judge_name) for mode in modes}
    confidence = {
        mode: Confidence(
            _interval(results[f"{mode}.entropy"], cfg), _interval(results[f"{mode}.max_prob"], cfg)
        )
        for mode in modes
    }
    samples = [
        Sample(
            results["prompt_text"][i],
            results["reference_text"][i],
            {
                mode: Continuation(results[f"{mode}.text"][i], results[f"{mode}.diverge_char"][i])
                for mode in modes
            },
        )
        for i in range(min(cfg.samples, len(tf)))
    ]
    return Compounding(
        reference,
        rollouts["greedy"],
        rollouts.get("sampled"),
        samples,
        nucleus=rollouts.get("nucleus"),
        beam=rollouts.get("beam"),
        confidence=confidence,
    )


def _summarize_rollout(
    results: dict[str, Any], mode: str, cfg: EvaluateConfig, judge_name: str | None
) -> RolloutResult:
    r = {k.split(".", 1)[1]: v for k, v in results.items() if k.startswith(f"{mode}.")}
    matches = r["matches"]
    n = matches.shape[1]
    survival = _interval(metrics.survival_indicators(matches), cfg)
    first = metrics.first_divergence(matches)
    low, high = metrics.bootstrap_ci(first, stat=np.median, n_boot=cfg.bootstrap, seed=cfg.seed)
    gap = ExposureGap(
        j=gap_positions(n, cfg.gap_horizon),
        horizon=cfg.gap_horizon,
        own_prefix_loss=r["gap_own"].mean(axis=0).tolist(),
        true_prefix_loss=r["gap_true"].mean(axis=0).tolist(),
        gap=_interval(r["gap_own"] - r["gap_true"], cfg),
    )
    degeneration = Degeneration(
        repetition_rate=_interval(r["repetition_rate"], cfg),
        distinct_1=_interval(r["distinct_1"], cfg),
        distinct_2=_interval(r["distinct_2"], cfg),
        looping=_interval((r["loop_period"] > 0).astype(np.float64), cfg),
    )
    judge = None
    if judge_name is not None and "judge_nll" in r:
        judge = Judge(
            teacher=judge_name,
            nll=_interval(r["judge_nll"], cfg),
            nll_reference=_interval(results["judge_nll_reference"], cfg),
            agreement_rollout=_interval(r["agreement_rollout"], cfg),
            agreement_data=_interval(results["agreement_data"], cfg),
        )
    return RolloutResult(
        accuracy_by_position=_interval(matches.astype(np.float64), cfg),
        survival_by_position=survival,
        half_life=metrics.half_life(np.asarray(survival.mean)),
        first_divergence_mean=_interval(first, cfg),
        first_divergence_median=Interval(float(np.median(first)), float(low), float(high)),
        first_divergence_histogram=metrics.divergence_histogram(first, n),
        diverged_fraction=float((first <= n).mean()),
        wer=_interval(r["wer"], cfg),
        cer=_interval(r["cer"], cfg),
        exposure_gap=gap,
        degeneration=degeneration,
        judge=judge,
    )


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------

MAX_NAME = 24
"""Longest derived model name (report tables, plot legends and TensorBoard's run list stay readable)."""
_STAMP = re.compile(r"-\d{8}-\d{6}$")  # what default run folders end in: <preset>-YYYYMMDD-HHMMSS


def run_name(export: Export) -> str:
    """The run folder's name for a run's best/ or last/ export, else the export folder's own name."""
    return export.path.parent.name if export.path.name in ("best", "last") else export.path.name


def short_name(export: Export) -> str:
    """A model's readable name: its run folder's name without the timestamp of a default run folder
    (runs/pretrain/shakespeare-20261201-192426/best -> shakespeare), as a file name, at most MAX_NAME long."""
    base = _STAMP.sub("", run_name(export)) or export.info.preset or "model"
    return _clip(re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_"), MAX_NAME)


def _clip(name: str, size: int) -> str:
    return name[:size].rstrip("-_.") or "model"


def _qualified(name: str, qualifier: str) -> str:
    return f"{_clip(name, MAX_NAME - len(qualifier) - 1)}-{qualifier}"


def _numbered(names: list[str]) -> list[str]:
    """Names repeated get -2, -3, ... (in order), so every name is unique."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def derived_names(exports: list[Export]) -> list[str]:
    """Each export's short name, told apart where two collide: by kind (teacher, student), then by
    export (best, last), then by a numeric suffix (-2, -3, ...)."""
    names = [short_name(e) for e in exports]
    qualifiers = (
        lambda e: e.info.kind if e.info.kind in ("teacher", "student") else "",
        lambda e: e.path.name if e.path.name in ("best", "last") else "",
    )
    for qualifier in qualifiers:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        for name, members in groups.items():
            tags = [qualifier(exports[i]) for i in members]
            if len(members) > 1 and len(set(tags)) > 1:  # this qualifier tells (some of) them apart
                for i, tag in zip(members, tags):
                    names[i] = _qualified(name, tag) if tag else name
    return _numbered(names)


def model_names(
    given: tuple[str, ...], exports: list[Export], judge: Export | None = None
) -> tuple[list[str], str | None]:
    """The names the models go by in report.md, the plots, metrics.json and TensorBoard (tb/<name>):
    `given` (--names, one per model), else `derived_names`; and the name of a judge that is not one of
    the models, distinct from theirs. Repeated names get a numeric suffix."""
    everyone = exports + ([judge] if judge is not None else [])
    if given:
        names = _numbered([*given, *([short_name(judge)] if judge is not None else [])])
    else:
        names = derived_names(everyone)
    return names[: len(exports)], (names[-1] if judge is not None else None)


# --------------------------------------------------------------------------------------------------
# Models that can be compared
# --------------------------------------------------------------------------------------------------


def check_window(
    seq_len: int, gap_horizon: int, models: dict[str, Export], everyone: dict[str, Export]
) -> int:
    """The teacher-forced window (seq_len, else the shortest context among everyone), checked: the gap
    horizon fits every context, and a window past a model's max_seq_len needs positions that
    extrapolate (a learned table has max_seq_len rows); else a UsageError."""
    shortest = min(e.model_cfg.max_seq_len for e in everyone.values())
    if gap_horizon >= shortest:
        raise UsageError(
            f"--gap-horizon {gap_horizon} must fit the shortest context among the models ({shortest} tokens); lower it"
        )
    seq_len = seq_len or shortest
    for name, export in models.items():
        n = export.model_cfg.max_seq_len
        if seq_len > n and export.model_cfg.positions == "learned":
            raise UsageError(
                f"--seq-len {seq_len} is past the max_seq_len={n} of model {name} ({export.path}), whose positions are "
                f"learned: the learned table has {n} rows, so a position >= {n} has no embedding; pick --seq-len <= {n} "
                f"or train with --model.positions rope|alibi|sinusoidal|none"
            )
    return seq_len


def _tokenizer_name(spec: dict[str, Any]) -> str:
    if spec["encoding"] == "char":
        return f"char ({len(spec['chars'])} symbols)"
    return spec.get("path", spec["encoding"])


def check_compatible(data_tokenizer: dict[str, Any], data_dir: Any, models: dict[str, Export]) -> None:
    """Every model reads the data's tokenizer, and all share one vocabulary map; else a UsageError."""
    first_name, first = next(iter(models.items()))
    for name, export in models.items():
        if export.tokenizer.spec != data_tokenizer:
            trained_on = export.info.data.dir if export.info.data is not None else "its training data"
            raise UsageError(
                f"model {name} ({export.path}) uses the tokenizer {_tokenizer_name(export.tokenizer.spec)}, but {data_dir} "
                f"was tokenized with {_tokenizer_name(data_tokenizer)}; pass --data with the tokenization it was trained on "
                f"({trained_on}), or compare only models of one tokenizer"
            )
        if export.vocab != first.vocab:
            raise UsageError(
                f"models {first_name} and {name} have different vocabulary maps ({_vocab_name(first.vocab)} vs "
                f"{_vocab_name(export.vocab)}); compare models trained with the same data.compact_vocab on the same data"
            )


def _vocab_name(vocab: VocabMap) -> str:
    return (
        f"{vocab.n_classes:,} classes of {vocab.full_size:,} ids"
        if vocab.compact
        else f"the full {vocab.full_size:,} ids"
    )
