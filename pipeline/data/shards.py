"""Reading token shards: validation against meta.json, training windows, evaluation windows.

Training windows are a pure function of (seed, step, micro-step, rank): each epoch cuts the train
split into non-overlapping windows of seq_len + 1 tokens at a random shift and visits them in a
random order. Step s takes the next `global batch` windows of that order; rank r, micro-step m takes
its own slice. So resuming needs only the step number, ranks never share a window, and 2 ranks x b
sequences see exactly the windows of 1 rank x 2b.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError

META = "meta.json"


@dataclass
class TokenData:
    """A tokenized data folder: meta.json plus memory-mapped train.bin and val.bin."""

    dir: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

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
            dtype = np.dtype(meta["dtype"])
            splits = {s: _open_split(directory, s, dtype, int(meta[f"{s}_tokens"])) for s in ("train", "val")}
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            if isinstance(err, UsageError):
                raise
            raise UsageError(
                f"{meta_path} is unreadable or incomplete ({err}); re-run tokenize with --overwrite"
            ) from err
        return cls(directory, meta, splits["train"], splits["val"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_spec(self.meta["tokenizer"])

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per val token: converts nats per token into bits per byte."""
        return self.meta["val_bytes"] / max(self.meta["val_tokens"], 1)


def _open_split(directory: Path, split: str, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    path = directory / f"{split}.bin"
    if not path.is_file():
        raise UsageError(f"{path} is missing; re-run tokenize with --overwrite")
    expected = n_tokens * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise UsageError(
            f"{path} holds {size:,} bytes but meta.json says {n_tokens:,} {dtype.name} tokens ({expected:,} bytes): "
            f"the file is truncated or from another tokenization; re-run tokenize with --overwrite"
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
