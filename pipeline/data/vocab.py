"""Vocabulary compaction: train on the ids the train split uses, plus one `other` class.

With K ids kept out of V, the model has K + 1 output classes. An id outside the kept set gets
probability p(other) / (V - K), so the model is still a proper distribution over all V ids and its
loss and bits per byte compare with a full-vocabulary model's. The identity map (no compaction)
has the same interface, so nothing else needs to know which one is in use.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


class VocabMap:
    def __init__(self, full_size: int, kept: np.ndarray | None = None) -> None:
        self.full_size = int(full_size)
        self.kept = None if kept is None else np.asarray(kept, dtype=np.int64)
        if self.kept is not None:
            if len(self.kept) >= self.full_size:
                raise ValueError("a compact vocabulary must keep fewer ids than the full vocabulary")
            if len(self.kept) and (np.any(np.diff(self.kept) <= 0) or self.kept[-1] >= self.full_size):
                raise ValueError("kept ids must be sorted, unique and below the vocabulary size")
            self._to_compact = np.full(self.full_size, len(self.kept), dtype=np.int64)
            self._to_compact[self.kept] = np.arange(len(self.kept))
            self._unseen: np.ndarray | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def identity(cls, full_size: int) -> VocabMap:
        return cls(full_size)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], mode: str) -> VocabMap:
        """The map a training run uses for data with this meta.json and `data.compact_vocab` mode.

        "on" with every id in use has nothing to compact and gives the identity map.
        """
        kept = np.asarray(meta["token_counts"]["ids"], dtype=np.int64)
        use = len(kept) < meta["vocab_size"] and (
            mode == "on" or (mode == "auto" and len(kept) < meta["vocab_size"] / 2)
        )
        return cls(meta["vocab_size"], kept) if use else cls.identity(meta["vocab_size"])

    def to_json(self) -> dict[str, Any]:
        return {"full_size": self.full_size, "kept_ids": None if self.kept is None else self.kept.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VocabMap:
        kept = data.get("kept_ids")
        return cls(data["full_size"], None if kept is None else np.asarray(kept))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        if self.full_size != other.full_size or (self.kept is None) != (other.kept is None):
            return False
        return self.kept is None or np.array_equal(self.kept, other.kept)

    # -- properties ----------------------------------------------------------------------------

    @property
    def compact(self) -> bool:
        return self.kept is not None

    @property
    def n_classes(self) -> int:
        """Output classes of the model: K + 1 when compact, V otherwise."""
        return self.full_size if self.kept is None else len(self.kept) + 1

    @property
    def other(self) -> int | None:
        """Class index of `other` (every id outside the kept set), or None without compaction."""
        return None if self.kept is None else len(self.kept)

    @property
    def log_unseen(self) -> float:
        """log(V - K): what one unseen id's log-probability lies below log p(other)."""
        return 0.0 if self.kept is None else math.log(self.full_size - len(self.kept))

    # -- mapping -------------------------------------------------------------------------------

    def to_compact(self, ids: np.ndarray) -> np.ndarray:
        return ids.astype(np.int64) if self.kept is None else self._to_compact[ids]

    def to_full(self, ids: Tensor | np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
        """Class indices back to vocabulary ids; `other` becomes a uniformly drawn unseen id."""
        ids = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        if self.kept is None:
            return ids.astype(np.int64)
        out = self.kept[np.minimum(ids, len(self.kept) - 1)]
        is_other = ids == self.other
        if is_other.any():
            unseen = self.unseen_ids()
            draw = torch.randint(len(unseen), (int(is_other.sum()),), generator=generator).numpy()
            out[is_other] = unseen[draw]
        return out

    def unseen_ids(self) -> np.ndarray:
        if self.kept is None:
            return np.zeros(0, dtype=np.int64)
        if self._unseen is None:
            self._unseen = np.flatnonzero(self._to_compact == len(self.kept))
        return self._unseen

    def full_log_probs(self, logits: Tensor) -> Tensor:
        """(..., n_classes) logits -> (..., V) log-probabilities over the full vocabulary."""
        logp = logits.float().log_softmax(dim=-1)
        if self.kept is None:
            return logp
        table = torch.as_tensor(self._to_compact, device=logits.device)
        full = logp.index_select(-1, table)
        is_unseen = table == self.other
        return torch.where(is_unseen, full - self.log_unseen, full)
