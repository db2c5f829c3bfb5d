"""Write an exported model as a Hugging Face transformers GPT-2 folder.

    python recipes/export.py --model runs/pretrain/shakespeare-A/best --out runs/hf/shakespeare-A
    python recipes/export.py --model runs/pretrain/char-X --out runs/hf/char-X --verify   # a run folder: its best/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('runs/hf/char-X')"

The folder holds config.json (model_type gpt2, activation "gelu": our GELU is exact, not GPT-2's
tanh "gelu_new"), model.safetensors (GPT2LMHeadModel's keys; Conv1D weights transposed), a README.md
saying how to load it, and gpt_distill.json (the source export, its tokenizer spec and vocabulary).
config.json's `tiktoken_encoding` names the tokenizer; no transformers tokenizer file is written.
--verify loads the folder with transformers and compares its logits with the export's (fp32).

What maps exactly: pre-LN transformer blocks with learned positions, GELU or ReLU, biases or none
(zeros), tied or untied heads, dropout, FFN-only or attention-only sublayers (zero weights), and
sinusoidal or no positions (a fixed wpe, up to max_seq_len). Refused with the reason and what to
train instead: RoPE, ALiBi, blocks without residuals or LayerNorms, non-causal attention, and
compacted vocabularies. A compacted export would need each unseen id's logit to be `other`'s minus
log(V-K): a per-id constant that GPT-2's bias-free LM head cannot add exactly (see
pipeline/run/huggingface.py), so it is refused: retrain with --data.compact-vocab off.
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from dataclasses import dataclass
from pathlib import Path

from pipeline import cli
from pipeline.errors import UsageError
from pipeline.run import checkpoint, huggingface


@dataclass
class ExportConfig:
    """Write an export as a transformers GPT-2 folder: recipes/export.py."""

    model: str = ""
    """Exported model folder (a run's best/ or last/), or a run folder (its best/ export is used)."""
    out: str = ""
    """Folder to write the GPT-2 model to (replaced when it holds an earlier GPT-2 export)."""
    verify: bool = False
    """Load the written folder with transformers and check its logits equal the export's (fp32)."""
    preset: str = "default"
    """Preset the defaults come from (only `default`)."""
    config: str = ""
    """TOML or YAML file of settings (command-line flags win)."""


PRESETS = {"default": ExportConfig}


def main(cfg: ExportConfig) -> dict:
    if not cfg.model or not cfg.out:
        raise UsageError("pass --model EXPORT (a run's best/ or last/, or the run folder) and --out DIR")
    export = checkpoint.load_export(cfg.model)
    out = Path(cfg.out)
    record = huggingface.export_gpt2(export, out)
    m = export.model_cfg
    print(
        f"wrote {out}: GPT-2 with {m.n_layers} layers x {m.n_heads} heads, d_model {m.d_model}, "
        f"vocabulary {m.vocab_size:,} ({record['encoding']}), context {m.max_seq_len}, from {export.path}"
    )
    for note in record["notes"]:
        print(f"note: {note}")
    if cfg.verify:
        diff = huggingface.verify_gpt2(export, out)
        print(f"verified: transformers' logits match the export's (max abs difference {diff:.2e})")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return record


if __name__ == "__main__":
    cli.run(main, cli.parse(ExportConfig, PRESETS))
