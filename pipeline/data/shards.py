"""Reading token shards: meta.json and shard checks, training windows, evaluation windows.

Training windows are a pure function of (seed, step, micro-step, rank): each epoch cuts the train
split into non-overlapping windows of seq_len + 1 tokens at a random shift and visits them in a
random order. Step s takes the next `global batch` windows of that order; rank r, micro-step m takes
its own slice. So resuming needs only the step number, ranks never share a window, and 2 ranks x b
sequences see exactly the windows of 1 rank x 2b.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.tokenizer import CHAR, Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError

META = "meta.json"


@dataclass
class TokenData:
    """A tokenized data folder: meta.json plus memory-mapped train.bin and val.bin.

    `open` checks the whole folder before anything else reads it (see `check_meta`): a folder it
    returns has every meta.json field the pipeline reads, of the right type, agreeing with the
    tokenizer it names and with the shards' sizes and ids.
    """

    dir: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray
    _tokenizer: Tokenizer | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, directory: str | Path) -> TokenData:
        directory = Path(directory)
        hint = f"tokenize it first: python recipes/tokenize.py --input CORPUS --out {directory}"
        if not directory.is_dir():
            raise UsageError(f"data folder {directory} does not exist; {hint}")
        meta_path = directory / META
        if not meta_path.is_file():
            raise UsageError(f"{directory} has no meta.json, so it is not a finished tokenization; {hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{meta_path} is unreadable ({err}); {_fix(meta_path)}") from err
        dtype, tokenizer = check_meta(meta, meta_path)
        splits = {s: _open_split(directory, s, dtype, meta[f"{s}_tokens"]) for s in SPLITS}
        check_ids(splits, meta, meta_path)
        return cls(directory, meta, splits["train"], splits["val"], tokenizer)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_spec(self.meta["tokenizer"])
        return self._tokenizer

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per val token: converts nats per token into bits per byte."""
        return self.meta["val_bytes"] / max(self.meta["val_tokens"], 1)


# --------------------------------------------------------------------------------------------------
# meta.json checks
# --------------------------------------------------------------------------------------------------


SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
_UINT16_IDS = 2**16


def _fix(meta_path: Path) -> str:
    return f"re-run `python recipes/tokenize.py --input CORPUS --out {meta_path.parent} --overwrite`"


def _refuse(meta_path: Path, field_name: str, problem: str) -> UsageError:
    return UsageError(f"{meta_path}: field '{field_name}' {problem}; {_fix(meta_path)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(table: Any, meta_path: Path, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """table[key] (name is the dotted field) when present and of type `kind`; else a UsageError."""
    key = name.rsplit(".", 1)[-1]
    if key not in table:
        raise _refuse(meta_path, name, "is missing")
    value = table[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise _refuse(meta_path, name, f"must be {what}, got {_short(value)}")
    return value


def _count(table: Any, meta_path: Path, name: str, minimum: int) -> int:
    value = _get(table, meta_path, name, int, f"an integer >= {minimum}")
    if value < minimum:
        raise _refuse(meta_path, name, f"must be an integer >= {minimum}, got {value}")
    return value


def check_meta(meta: Any, meta_path: Path) -> tuple[np.dtype, Tokenizer]:
    """Every meta.json field the pipeline reads: present, typed and consistent; (dtype, tokenizer).

    The shards are checked against it afterwards (`_open_split` for sizes, `check_ids` for ids).
    """
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_path} must hold a JSON object, got {_short(meta)}; {_fix(meta_path)}")
    tokenizer = _check_tokenizer(meta, meta_path)
    encoding = _get(meta, meta_path, "encoding", str, "a string")
    if encoding != tokenizer.name:
        raise _refuse(
            meta_path, "encoding", f"is {encoding!r} but field 'tokenizer' names {tokenizer.name!r}"
        )
    vocab_size = _count(meta, meta_path, "vocab_size", 1)
    if vocab_size != tokenizer.vocab_size:
        raise _refuse(
            meta_path,
            "vocab_size",
            f"is {vocab_size:,} but field 'tokenizer' ({tokenizer.name}) has {tokenizer.vocab_size:,} ids",
        )
    dtype_name = _get(meta, meta_path, "dtype", str, f"one of {', '.join(DTYPES)}")
    if dtype_name not in DTYPES:
        raise _refuse(
            meta_path, "dtype", f"must be one of {', '.join(DTYPES)} (integer token ids), got {dtype_name!r}"
        )
    if dtype_name == "uint16" and vocab_size > _UINT16_IDS:
        raise _refuse(
            meta_path, "dtype", f"is uint16, which cannot hold ids of a vocabulary of {vocab_size:,}"
        )
    for split in SPLITS:
        _count(meta, meta_path, f"{split}_tokens", 0)
    _count(meta, meta_path, "val_bytes", 1)
    _check_token_counts(meta, meta_path, vocab_size)
    source = _get(meta, meta_path, "source", dict, "an object")
    _get(source, meta_path, "source.sha256", (str, type(None)), "a string or null")
    return np.dtype(dtype_name), tokenizer


def _check_tokenizer(meta: dict[str, Any], meta_path: Path) -> Tokenizer:
    spec = _get(meta, meta_path, "tokenizer", dict, "an object (a tokenizer spec)")
    kind = _get(spec, meta_path, "tokenizer.encoding", str, "a string")
    if kind == CHAR:
        chars = _get(spec, meta_path, "tokenizer.chars", str, "a string of the vocabulary's characters")
        if not chars or len(set(chars)) != len(chars):
            raise _refuse(meta_path, "tokenizer.chars", "must be a non-empty string of distinct characters")
    elif kind == "tiktoken_file":
        for key in ("path", "pattern_from", "sha256"):
            if key != "sha256" or key in spec:  # from_spec compares the file with a recorded sha256
                _get(spec, meta_path, f"tokenizer.{key}", str, "a string")
    try:
        return Tokenizer.from_spec(spec)
    except (
        UsageError
    ) as err:  # unknown encoding, missing or changed file, tiktoken offline: each names its fix
        raise UsageError(f"{meta_path}: field 'tokenizer' cannot be built: {err}") from err


def _check_token_counts(meta: dict[str, Any], meta_path: Path, vocab_size: int) -> None:
    """Train-split token counts: ids sorted, unique, < vocab_size; counts >= 1 summing to train_tokens."""
    table = _get(meta, meta_path, "token_counts", dict, "an object with lists 'ids' and 'counts'")
    lists = {}
    for key in ("ids", "counts"):
        name = f"token_counts.{key}"
        values = _get(table, meta_path, name, list, "a list of integers")
        if not all(_is_int(v) and 0 <= v < 2**63 for v in values):
            raise _refuse(meta_path, name, "must be a list of non-negative integers")
        lists[key] = np.asarray(values, dtype=np.int64).reshape(-1)
    ids, counts = lists["ids"], lists["counts"]
    if len(ids) != len(counts):
        raise _refuse(meta_path, "token_counts", f"has {len(ids):,} ids but {len(counts):,} counts")
    if len(ids) and (ids[0] < 0 or ids[-1] >= vocab_size or np.any(np.diff(ids) <= 0)):
        raise _refuse(
            meta_path, "token_counts.ids", f"must be sorted, unique and in [0, vocab_size={vocab_size:,})"
        )
    total = sum(table["counts"])  # in Python ints: a damaged file's counts may overflow int64
    if np.any(counts < 1) or total != meta["train_tokens"]:
        raise _refuse(
            meta_path,
            "token_counts.counts",
            f"must be counts >= 1 summing to field 'train_tokens' ({meta['train_tokens']:,}), "
            f"got a sum of {total:,}",
        )


def check_ids(splits: dict[str, np.ndarray], meta: dict[str, Any], meta_path: Path) -> None:
    """The shards' largest ids: below vocab_size, and the train split's the last of token_counts.ids.

    One vectorised max over each memory map (milliseconds for a million tokens, a memory-bandwidth
    pass over larger shards).
    """
    vocab_size, counted = meta["vocab_size"], meta["token_counts"]["ids"]
    for split, tokens in splits.items():
        top = int(tokens.max())
        if top >= vocab_size:
            raise _refuse(
                meta_path,
                "vocab_size",
                f"is {vocab_size:,} but {split}.bin holds id {top:,} (ids must be < vocab_size)",
            )
        if split == "train" and (not counted or top != counted[-1]):
            raise _refuse(
                meta_path,
                "token_counts.ids",
                f"ends at {counted[-1] if counted else None} but the largest id in train.bin is {top:,}",
            )


def _open_split(directory: Path, split: str, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    path = directory / f"{split}.bin"
    if not path.is_file():
        raise UsageError(f"{path} is missing; {_fix(directory / META)}")
    expected = n_tokens * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise UsageError(
            f"{path} holds {size:,} bytes but meta.json fields '{split}_tokens' and 'dtype' say {n_tokens:,} "
            f"{dtype.name} tokens ({expected:,} bytes): the file is truncated or from another tokenization; "
            f"{_fix(directory / META)}"
        )
    if n_tokens == 0:
        raise UsageError(f"{path} holds no tokens; tokenize a larger corpus")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


# --------------------------------------------------------------------------------------------------
# Training windows
# --------------------------------------------------------------------------------------------------


SAMPLING = ("random", "epochs", "grid")
_BLOCK = 4096  # random offsets are drawn in seeded blocks of this many samples


class TrainWindows:
    """Windows of the train split for (step, micro_step) on one rank; see the module docstring.

    sampling="random": window i starts at a seeded uniform offset (nanoGPT's sampling, which sees
    every token at every position of a window); "epochs": each epoch cuts the split into
    non-overlapping windows at a random shift and visits them in a random order; "grid": the same
    without the shift, so window w is always tokens [w*T, w*T + T + 1) (the teacher cache needs
    this). In every mode window i is a pure function of (seed, i).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        vocab: VocabMap | None = None,
        sampling: str = "random",
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        self.tokens, self.seq_len, self.seed, self.sampling = tokens, seq_len, seed, sampling
        self.micro, self.accum = micro_batch_size, grad_accum_steps
        self.rank, self.world = rank, world_size
        self.vocab = vocab
        self.n_windows = len(tokens) // seq_len - 1
        if self.n_windows < 1:
            raise UsageError(
                f"the train split has {len(tokens):,} tokens, too few for two windows of data.seq_len={seq_len}; "
                f"lower --data.seq-len or tokenize a larger corpus"
            )

    @property
    def sequences_per_step(self) -> int:
        return self.micro * self.accum * self.world

    def epoch_of(self, step: int) -> float:
        return step * self.sequences_per_step / self.n_windows

    @lru_cache(maxsize=2)  # noqa: B019 - the instance lives as long as the run
    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(self.seq_len))
        return (0 if self.sampling == "grid" else shift), rng.permutation(self.n_windows)

    @lru_cache(maxsize=2)  # noqa: B019
    def _random_block(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, block, 0x72616E64])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=_BLOCK)

    def starts(self, step: int, micro_step: int) -> np.ndarray:
        first = step * self.sequences_per_step + (micro_step * self.world + self.rank) * self.micro
        index = np.arange(first, first + self.micro)
        out = np.empty(self.micro, dtype=np.int64)
        period = _BLOCK if self.sampling == "random" else self.n_windows
        for part in np.unique(index // period):
            sel = index // period == part
            if self.sampling == "random":
                out[sel] = self._random_block(int(part))[index[sel] % period]
            else:
                shift, order = self._epoch_order(int(part))
                out[sel] = shift + order[index[sel] % period] * self.seq_len
        return out

    def batch(self, step: int, micro_step: int) -> tuple[Tensor, Tensor]:
        """(x, y), each (micro_batch_size, seq_len) int64, on the CPU."""
        return windows(self.tokens, self.starts(step, micro_step), self.seq_len, self.vocab)


def windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, vocab: VocabMap | None
) -> tuple[Tensor, Tensor]:
    block = np.stack([tokens[s : s + seq_len + 1] for s in starts])  # (B, T + 1)
    block = vocab.to_compact(block) if vocab is not None else block.astype(np.int64)
    block = torch.from_numpy(block)
    return block[:, :-1], block[:, 1:]


# --------------------------------------------------------------------------------------------------
# Evaluation windows
# --------------------------------------------------------------------------------------------------


def eval_starts(n_tokens: int, seq_len: int, budget_tokens: int) -> np.ndarray:
    """Fixed, evenly spread, non-overlapping windows covering about `budget_tokens` of a split."""
    n_all = (n_tokens - 1) // seq_len
    if n_all < 1:
        raise UsageError(
            f"the val split has {n_tokens:,} tokens, fewer than one window of data.seq_len={seq_len}; "
            f"lower --data.seq-len or raise the tokenizer's val_fraction"
        )
    n = min(n_all, max(1, budget_tokens // seq_len))
    return np.linspace(0, n_all - 1, n).round().astype(np.int64) * seq_len


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    budget_tokens: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    vocab: VocabMap | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """This rank's share of the fixed evaluation windows, in batches.

    The window count is trimmed to a multiple of world_size so every rank runs the same number of
    forward passes (sharded models hold collectives inside forward).
    """
    starts = eval_starts(len(tokens), seq_len, budget_tokens)
    starts = starts[: max(len(starts) // world_size, 1) * world_size][rank::world_size]
    return [
        windows(tokens, starts[i : i + batch_size], seq_len, vocab) for i in range(0, len(starts), batch_size)
    ]
