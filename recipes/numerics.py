"""Mask values against attention-score dtypes (exercise H2.3): a table, no training.

    python recipes/numerics.py                                  # CPU, a second
    python recipes/numerics.py --head-dim 256 --score-scale 1e4  # big scores: -1e4 leaks onto masked keys
    python recipes/numerics.py --n-keys 64 --seed 1

For each mask value (-inf, -1e9, -1e4, fp32's most negative number, the score dtype's own) and
each score dtype (fp32, bf16, fp16), one row of --n-keys scores (std --score-scale, first half of
the keys allowed) goes through what the model's explicit attention path does with
--model.mask-value and --model.score-dtype (the mask written in fp32, cast to the score dtype,
added, softmax there; pipeline/model/numerics.py). Columns:

    stored     the mask value after the cast (fp16 turns -1e9 into -inf)
    full row   softmax of a fully masked row: nan (-inf everywhere: 0/0), uniform (a finite value
               swamps the scores: the row leaks onto keys it must not see), unmasked (a value small
               beside the scores shifts them all alike), rounded (between the two)
    leaked     probability on the masked keys of the partly masked row
    max err    largest error of that row against an fp64 softmax over the allowed keys
    overflow   the unscaled QK^T magnitude that is inf in the dtype, and the size of aligned q and
               k entries that reach it at --head-dim

Training with --model.score-dtype fp16 and scores past the overflow ends through the loop's
non-finite check (a NaN loss), never silently.
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from dataclasses import dataclass

from pipeline import cli
from pipeline.config import require
from pipeline.model.numerics import MaskNumerics, numerics_table


@dataclass
class NumericsConfig:
    """The row of scores the table is measured on."""

    head_dim: int = 64
    """Head size for the overflow column (the seed model's: 256 / 4 heads)."""
    n_keys: int = 16
    """Keys in the row of scores (the first half allowed in the partly masked row)."""
    score_scale: float = 3.0
    """Standard deviation of the (already 1/sqrt(d)-scaled) scores."""
    seed: int = 0
    """Seed of the row of scores."""
    preset: str = "default"
    """Preset: default (the only one)."""
    config: str = ""
    """TOML/YAML/JSON file of values (flags override it)."""

    def __post_init__(self) -> None:
        require(self.head_dim > 0, f"--head-dim must be > 0, got {self.head_dim}")
        require(
            self.n_keys >= 2, f"--n-keys must be >= 2 (one allowed and one masked key), got {self.n_keys}"
        )
        require(
            0 < self.score_scale < float("inf"),
            f"--score-scale must be a finite number > 0, got {self.score_scale}",
        )


PRESETS = {"default": NumericsConfig}

COLUMNS = ("mask", "dtype", "stored", "full row", "leaked", "max err", "overflow", "at q,k entry")


def format_row(row: MaskNumerics) -> tuple[str, ...]:
    return (
        row.mask,
        row.dtype,
        f"{row.stored:.4g}" + (" (was finite)" if row.becomes_inf else ""),
        row.full_row,
        f"{row.leaked:.3g}",
        f"{row.max_error:.2g}",
        f"{row.overflow_score:.4g}",
        f"{row.overflow_entry:.3g}",
    )


def main(cfg: NumericsConfig) -> list[MaskNumerics]:
    rows = numerics_table(cfg.head_dim, cfg.n_keys, cfg.score_scale, cfg.seed)
    cells = [COLUMNS, *(format_row(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    print(
        f"{cfg.n_keys} keys, scores of std {cfg.score_scale:g} (first {max(1, cfg.n_keys // 2)} allowed), "
        f"head size {cfg.head_dim}"
    )
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    legend = __doc__.split("Columns:\n", 1)[1].split("\n\n", 1)[0]  # the docstring's column legend
    print("\ncolumns:\n" + legend)
    return rows


if __name__ == "__main__":
    cli.run(main, cli.parse(NumericsConfig, PRESETS))
