"""The memory account of a preset's training step: what each term costs and how it scales (H1.1, H1.3, H1.4, H10.3).

    python recipes/memory.py --preset seed                          # the exercise sheet's model
    python recipes/memory.py --preset seed --data.seq-len 128       # H1.4: half the context
    python recipes/memory.py --preset seed --model.d-model 512      # H1.3: twice the width
    python recipes/memory.py --preset seed --train.precision bf16 --train.activation-checkpointing
    python recipes/memory.py --preset seed --measure                # + one real CPU step's measured peak

Any teacher preset, and every pretrain flag parses; the account follows those that shape one
micro-step's memory (--model.*, --data.seq-len, --train.micro-batch-size, --train.precision,
--train.activation-checkpointing, --train.attention-kernel): AdamW's settings, the accumulation
and the schedule cost no memory and change nothing here. The vocabulary comes from --model.vocab-size, else
the data's meta.json (--data DIR, or the preset's default folder when it exists, with its
--data.compact-vocab), else the encoding's size (tiktoken; TIKTOKEN_CACHE_DIR works offline).
Prints every term (bytes, formula, whether this path holds it) with its factor when T, d_model or
n_heads doubles, and the activations tensor by tensor. `--measure` runs two training steps of the
model on the CPU in a fresh process (random tokens; the second is measured, with optimizer state)
and prints its peak resident memory, less the process's own, beside the analytic total.
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import accel, cli
from pipeline.config import DataConfig, PretrainConfig, TokenizeConfig
from pipeline.data import tokenize
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.model.gpt import GPT
from pipeline.model.memory import account_lines, human, memory_account
from pipeline.studies.benchmark import Case, available_gib, in_child
from pipeline.train.losses import loss_chunk_rows
from teachers import PRESETS as TEACHERS


@dataclass
class MemoryConfig(PretrainConfig):
    """The memory account of a pretrain configuration (any teacher preset and its flags)."""

    preset: str = "seed"
    """Teacher preset whose model, data and batch are accounted (see teachers/)."""
    measure: bool = False
    """Also run two training steps on the CPU and print the measured peak beside the analytic total."""
    max_mem_gib: float = 0.0
    """With --measure: memory the measured step may take before it counts as not fitting; 0: available minus 1 GiB."""


def _from_teacher(name: str):
    def preset() -> MemoryConfig:
        base = TEACHERS[name]()
        return MemoryConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})

    return preset


PRESETS = {name: _from_teacher(name) for name in TEACHERS}


def vocab_classes(data: DataConfig) -> tuple[int, str]:
    """Output classes of the model this data gives, and where the number came from."""
    folder = (
        Path(data.dir)
        if data.dir
        else tokenize.default_out(TokenizeConfig(input=data.corpus, encoding=data.encoding))
    )
    meta_path = folder / tokenize.META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        vocab = VocabMap.from_meta(meta, data.compact_vocab)
        return vocab.n_classes, f"{meta_path} (--data.compact-vocab {data.compact_vocab})"
    if data.dir:
        raise UsageError(
            f"--data {data.dir}: no {tokenize.META} there; tokenize it or pass --model.vocab-size N"
        )
    try:
        size = Tokenizer.build(data.encoding).vocab_size
    except UsageError as err:
        raise UsageError(f"{err}; or pass the vocabulary size with --model.vocab-size N") from err
    if size <= 0:  # 'char' builds its vocabulary from the corpus
        raise UsageError(f"--data.encoding {data.encoding} has no fixed size: pass --model.vocab-size N")
    return size, f"the {data.encoding} encoding (the full vocabulary: compaction needs the data's meta.json)"


def measure(cfg: MemoryConfig, precision: str, device: torch.device) -> dict:
    """Two training steps of the model on the CPU in a fresh process; the second one's peak memory."""
    model = cfg.model
    ids = torch.randint(0, model.vocab_size, (2, cfg.train.micro_batch_size, cfg.data.seq_len + 1))
    batches = [(seq[:, :-1], seq[:, 1:]) for seq in ids]
    case = Case(
        "train", "pipeline", "full", dataclasses.asdict(model), cfg.train.micro_batch_size, cfg.data.seq_len,
        precision, str(device), warmup=1, repeats=1, threads=torch.get_num_threads(),
        mem_limit_gib=cfg.max_mem_gib or max(available_gib() - 1.0, 1.0),
        checkpointing=cfg.train.activation_checkpointing,
    )  # fmt: skip
    return in_child(case, batches)


def parameters(cfg: MemoryConfig) -> dict[str, int]:
    """Parameters per group (GPT.param_counts) of the model, built on the meta device: no memory used."""
    with torch.device("meta"):
        return GPT(cfg.model).param_counts()


def main(cfg: MemoryConfig) -> dict:
    source = "--model.vocab-size"
    if not cfg.model.vocab_size:
        classes, source = vocab_classes(cfg.data)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=classes))
    cpu = torch.device("cpu")
    precision = accel.resolve_precision(cfg.train.precision, "cpu")
    kernel = accel.attention_kernel(cpu, precision)
    if cfg.train.attention_kernel != "auto":
        kernel = cfg.train.attention_kernel
    rows = loss_chunk_rows(cfg.model.vocab_size)
    account = memory_account(
        cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len, precision=precision, chunk_rows=rows,
        checkpointing=cfg.train.activation_checkpointing, attention_kernel=kernel,
    )  # fmt: skip
    print(f"preset {cfg.preset}: {cfg.model.vocab_size:,} output classes from {source}")
    counts = parameters(cfg)
    print("parameters: " + ", ".join(f"{k} {v:,} ({v / counts['total']:.2%})" for k, v in counts.items() if k != "total")
          + f"; total {counts['total']:,}")  # fmt: skip
    T = cfg.data.seq_len
    print(f"causal mask: {T * (T - 1) // 2:,} of the {T * T:,} entries of each (T, T) score matrix are masked "
          f"({(T - 1) / (2 * T):.1%}), T(T-1)/2")  # fmt: skip
    print("\n".join(account_lines(account, scaling=True, breakdown=True)))
    print("  (- : a term this path does not hold. Precision and attention kernel as a CPU run picks them.)")
    result = {"account": account.to_json(), "parameters": counts}
    if cfg.measure:
        row = measure(cfg, precision, cpu)
        if not row.get("fits"):
            print(f"measured: did not run ({row.get('note', '')})")
        else:
            own = (row["peak_mem_gib"] - row["base_mem_gib"]) * 2**30
            print(
                f"measured on {accel.device_description(cpu)}: peak resident {row['peak_mem_gib']:.2f} GiB, "
                f"{human(own)} over the process's own {row['base_mem_gib']:.2f} GiB; analytic total "
                f"{human(account.total)} ({own / account.total:.0%} of it); step {row['step_s']:.1f} s"
            )
        result["measured"] = row
    return result


if __name__ == "__main__":
    cli.run(main, cli.parse(MemoryConfig, PRESETS))
