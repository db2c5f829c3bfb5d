"""Autoregressive generation: greedy, temperature, top-k, top-p, beam search, with a KV cache.

Every strategy works on the model's class ids and returns class ids; `to_text` maps them back to
vocabulary ids (`VocabMap.to_full`) and decodes them.

**Compacted vocabularies.** A compact model has K kept ids plus one `other` class standing for the
V - K ids unseen in training, each with probability p(other) / (V - K). Strategies that *rank*
ids (greedy, top-k, top-p, beam search) rank ids, not classes: the `other` logit is lowered by
log(V - K) to one unseen id's share, so `other` wins only when a single unseen id beats every kept
id, and in top-k/top-p it counts as one id. Plain temperature sampling (no top-k/top-p) is exact
over all V ids: the temperature acts on id logits and `other` then carries the tempered mass of
all V - K unseen ids. Either way a sampled `other` becomes a uniformly drawn unseen id in
`to_text`. Repetition penalty acts on class logits, before any of this.

**Context past max_seq_len** (exercise H9.5): with learned or sinusoidal (absolute) positions the
context slides, keeping the last max_seq_len tokens and recomputing their keys and values each step
(so the cache and no-cache paths give the same tokens); with RoPE, ALiBi or no positions the oldest
cached keys are dropped (`KVCache.drop_oldest`) and generation continues at growing absolute
positions, which these encodings see only as distances. For one layer that equals recomputing the
window; deeper layers keep keys computed while the dropped tokens were still visible.

**Stop strings** end a row once its generated text contains one (kept ids are decoded, `other` as
nothing). Positions after a row's end hold `PAD` (-1); `strip_pad` removes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.config import SamplingConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.model.gpt import GPT, KVCache

__all__ = [
    "PAD",
    "SamplingConfig",
    "StopStrings",
    "beam_search",
    "filter_logits",
    "generate",
    "strip_pad",
    "to_text",
    "truncate_at_stop",
]

PAD = -1
RELATIVE_POSITIONS = ("rope", "alibi", "none")


# --------------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------------


def id_logits(logits: Tensor, vocab: VocabMap | None) -> Tensor:
    """fp32 logits that rank vocabulary ids: `other` lowered by log(V - K) to one unseen id's share."""
    logits = logits.float().clone()
    if vocab is not None and vocab.compact:
        logits[:, vocab.other] -= vocab.log_unseen
    return logits


def repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on (B, V) logits: tokens in `context` (B, L) get logit/penalty if > 0, else x penalty."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, context)
    return logits.scatter(1, context, torch.where(seen > 0, seen / penalty, seen * penalty))


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (B, V) logits."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token(
    logits: Tensor,
    context: Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    vocab: VocabMap | None = None,
) -> Tensor:
    """Class id (B,) picked from class logits (B, C) given the context (B, L); see the module docstring."""
    scores = id_logits(repetition_penalty(logits.float(), context, cfg.repetition_penalty), vocab)
    if cfg.temperature <= 0:
        return scores.argmax(dim=-1)
    scores = filter_logits(scores, cfg.temperature, cfg.top_k, cfg.top_p)
    if vocab is not None and vocab.compact and not cfg.top_k and cfg.top_p >= 1.0:
        scores[:, vocab.other] += vocab.log_unseen  # every unseen id at its tempered share
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def id_log_probs(logits: Tensor, vocab: VocabMap | None) -> Tensor:
    """(B, C) class logits -> log-probabilities of vocabulary ids (`other`: one unseen id)."""
    logp = logits.float().log_softmax(dim=-1)
    if vocab is not None and vocab.compact:
        logp[:, vocab.other] -= vocab.log_unseen
    return logp


# --------------------------------------------------------------------------------------------------
# Decoding steps with a KV cache
# --------------------------------------------------------------------------------------------------


class Decoder:
    """Next-token logits of growing sequences; each call after the first sees one more token per row."""

    def __init__(self, model: GPT, use_cache: bool) -> None:
        self.model, self.use_cache = model, use_cache
        self.window = model.cfg.max_seq_len
        self.relative = model.cfg.positions in RELATIVE_POSITIONS
        self.cache: KVCache | None = None

    def logits(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) -> logits (B, C) of the token after them."""
        model, window = self.model, self.window
        if not self.use_cache:
            return model(tokens[:, -window:], last_only=True)[:, -1]
        if self.cache is None or (not self.relative and self.cache.next_pos >= window):
            self.cache = KVCache.empty(len(model.blocks))  # (re)start from the whole visible context
            return model(tokens[:, -window:], cache=self.cache, last_only=True)[:, -1]
        if self.cache.length >= window:
            self.cache.drop_oldest(self.cache.length - window + 1)
        return model(tokens[:, -1:], cache=self.cache)[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep (and repeat) batch rows `index` of the cache."""
        if self.cache is not None:
            self.cache.reorder(index)


# --------------------------------------------------------------------------------------------------
# Stop strings and text
# --------------------------------------------------------------------------------------------------


class StopStrings:
    """Tells which rows of generated class ids contain one of `strings` in their decoded text."""

    def __init__(self, strings: Sequence[str], tokenizer: Tokenizer, vocab: VocabMap) -> None:
        self.strings = [s for s in strings if s]
        self.tokenizer, self.vocab = tokenizer, vocab
        # Every token decodes to at least one character, so this many tokens hold any stop string.
        self.tail = max((len(s) for s in self.strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.strings)

    def hit(self, ids: Sequence[int] | Tensor) -> bool:
        """Whether one row of generated class ids (no PAD) contains a stop string."""
        ids = [int(i) for i in ids[-self.tail :]]
        kept = [i for i in ids if self.vocab.other is None or i < self.vocab.other]
        text = self.tokenizer.decode(self.vocab.to_full(np.asarray(kept, dtype=np.int64)))
        return any(s in text for s in self.strings)

    def __call__(self, generated: Tensor) -> Tensor:
        """(B, n) generated class ids -> (B,) bool."""
        return torch.tensor([self.hit(row) for row in generated.tolist()], device=generated.device)


def truncate_at_stop(text: str, strings: Sequence[str]) -> str:
    """`text` cut before the first occurrence of any stop string."""
    cut = min((i for s in strings if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def strip_pad(row: Tensor) -> Tensor:
    return row[row != PAD]


def to_text(
    ids: Tensor, tokenizer: Tokenizer, vocab: VocabMap, generator: torch.Generator | None = None
) -> str:
    """One row of class ids (PAD ignored) as text; `other` becomes a uniformly drawn unseen id."""
    return tokenizer.decode(vocab.to_full(strip_pad(ids.detach().cpu()), generator=generator))


# --------------------------------------------------------------------------------------------------
# Sampling and greedy
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: GPT,
    prompt: Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    *,
    vocab: VocabMap | None = None,
    stop: StopStrings | None = None,
) -> Tensor:
    """prompt (B, P) class ids -> (B, P + max_new_tokens); rows that hit a stop string end in PAD.

    `cfg.num_beams > 1` runs beam search (one best sequence per row). `generator` seeds sampling;
    it must live on the prompt's device. `vocab` makes greedy/top-k/top-p rank ids (see above).
    """
    if cfg.num_beams > 1:
        return beam_search(model, prompt, cfg, vocab=vocab, stop=stop)
    was_training = model.training
    model.eval()
    decoder = Decoder(model, cfg.use_cache)
    B, P = prompt.shape
    tokens = prompt
    ends = torch.full((B,), P + cfg.max_new_tokens, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(cfg.max_new_tokens):
        step = next_token(decoder.logits(tokens), tokens, cfg, generator, vocab)
        tokens = torch.cat((tokens, step[:, None]), dim=1)
        if stop:
            hit = stop(tokens[:, P:]) & ~done
            ends[hit] = tokens.shape[1]
            done |= hit
            if bool(done.all()):
                break
    if was_training:
        model.train()
    return _pad_after(tokens, ends, P + cfg.max_new_tokens)


def _pad_after(tokens: Tensor, ends: Tensor, length: int) -> Tensor:
    """Pad (B, L) to `length` columns and put PAD at every position >= ends[row]."""
    out = torch.full((tokens.shape[0], length), PAD, dtype=tokens.dtype, device=tokens.device)
    out[:, : tokens.shape[1]] = tokens
    columns = torch.arange(length, device=tokens.device)
    return out.masked_fill(columns[None, :] >= ends[:, None], PAD)


# --------------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def beam_search(
    model: GPT,
    prompt: Tensor,
    cfg: SamplingConfig,
    *,
    vocab: VocabMap | None = None,
    stop: StopStrings | None = None,
) -> Tensor:
    """The most likely continuation of each prompt row under a beam of `cfg.num_beams`.

    Beams are ranked by summed id log-probabilities (after the repetition penalty). A beam that hits
    a stop string is finished and scored log p / generated_length ** length_penalty; the search
    ends when every row holds num_beams finished beams or after max_new_tokens, when the live beams
    join the finished ones. Temperature, top-k and top-p do not apply. Returns (B, P + N).
    """
    was_training = model.training
    model.eval()
    B, P = prompt.shape
    W, N = cfg.num_beams, cfg.max_new_tokens
    decoder = Decoder(model, cfg.use_cache)
    tokens = prompt.repeat_interleave(W, dim=0)  # (B*W, P)
    scores = torch.zeros(B, W, device=prompt.device)
    scores[:, 1:] = float("-inf")  # identical beams at the start: expand only the first
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    for _ in range(N):
        logits = repetition_penalty(decoder.logits(tokens).float(), tokens, cfg.repetition_penalty)
        total = scores[:, :, None] + id_log_probs(logits, vocab).view(B, W, -1)  # (B, W, C)
        top_scores, top_index = total.view(B, -1).topk(min(2 * W, total[0].numel()), dim=-1)
        rows, classes, new_scores = [], [], torch.full_like(scores, float("-inf"))
        for b in range(B):
            candidates = list(zip(top_scores[b].tolist(), top_index[b].tolist()))
            beams = tokens[b * W : (b + 1) * W]
            alive = _extend_row(candidates, beams, total.shape[-1], finished[b], stop, P, cfg.length_penalty)
            for slot, (_, _, score) in enumerate(alive):
                new_scores[b, slot] = score
            # Rows with fewer live candidates keep dead copies (score -inf) so the batch stays B*W.
            rows += [b * W + beam for beam, _, _ in alive] + [b * W] * (W - len(alive))
            classes += [cls for _, cls, _ in alive] + [0] * (W - len(alive))
        index = torch.tensor(rows, device=prompt.device)
        step_ids = torch.tensor(classes, dtype=tokens.dtype, device=prompt.device)
        tokens = torch.cat((tokens.index_select(0, index), step_ids[:, None]), dim=1)
        decoder.reorder(index)
        scores = new_scores
        if all(len(f) >= W for f in finished):
            break
    if was_training:
        model.train()
    return _best_beams(tokens, scores, finished, P, N, cfg.length_penalty)


def _extend_row(
    candidates: list[tuple[float, int]],
    beams: Tensor,
    n_classes: int,
    finished: list[tuple[float, Tensor]],
    stop: StopStrings | None,
    P: int,
    length_penalty: float,
) -> list[tuple[int, int, float]]:
    """One row's next live beams as (beam, class, score), best first, from its best (score, flat index)
    candidates; candidates that complete a stop string join `finished` instead."""
    W = beams.shape[0]
    alive: list[tuple[int, int, float]] = []
    for score, flat in candidates:
        if score == float("-inf") or len(alive) == W:
            break
        beam, cls = divmod(flat, n_classes)
        if stop:
            generated = [*beams[beam, P:].tolist(), cls]
            if stop.hit(generated):
                if len(finished) < W:
                    seq = torch.cat((beams[beam], beams.new_tensor([cls])))
                    finished.append((score / len(generated) ** length_penalty, seq))
                continue
        alive.append((beam, cls, score))
    return alive


def _best_beams(
    tokens: Tensor,
    scores: Tensor,
    finished: list[list[tuple[float, Tensor]]],
    P: int,
    N: int,
    length_penalty: float,
) -> Tensor:
    B, W = scores.shape
    out = torch.full((B, P + N), PAD, dtype=tokens.dtype, device=tokens.device)
    generated = tokens.shape[1] - P
    for b in range(B):
        candidates = list(finished[b])
        for beam in range(W):
            score = float(scores[b, beam])
            if score > float("-inf") and generated > 0:
                candidates.append((score / generated**length_penalty, tokens[b * W + beam]))
        if not candidates:  # nothing generated (max_new_tokens 0)
            candidates = [(0.0, tokens[b * W])]
        best = max(candidates, key=lambda c: c[0])[1]
        out[b, : len(best)] = best
    return out
