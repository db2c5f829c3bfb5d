"""Continue a prompt with an exported model and print the text.

    python recipes/generate.py --model runs/pretrain/shakespeare-A --prompt "ROMEO:"      # CPU or GPU
    python recipes/generate.py --model EXPORT --prompt "ROMEO:" --preset greedy
    python recipes/generate.py --model EXPORT --preset nucleus --num-samples 3 --seed 7
    python recipes/generate.py --model EXPORT --preset beam --sampling.num-beams 8 --sampling.length-penalty 1.2 --stop "\\n\\n"
    python recipes/generate.py --model EXPORT --sampling.temperature 0.7 --sampling.top-k 50 --sampling.repetition-penalty 1.3
    python recipes/generate.py --model EXPORT --sampling.max-new-tokens 2000           # far past max_seq_len
    accelerate launch recipes/generate.py --model EXPORT                               # on the launch config's device

Every sampler setting is a --sampling.* flag (`--help` lists them): max-new-tokens, temperature
(0: greedy), top-k, top-p, repetition-penalty, num-beams, length-penalty, use-cache/no-use-cache.
Presets: default (temperature 0.8, top-k 200), greedy, nucleus (top-p 0.9), beam (4 beams).
--stop strings end a continuation (the text is cut before them); --seed makes sampling repeatable;
--num-samples draws several continuations as one batch. The prompt and stop strings understand
backslash escapes (\\n, \\t). Text goes to stdout; a line of timing to stderr.

Compacted vocabularies: the model picks among its kept ids and one `other` class; greedy, top-k,
top-p and beam search rank `other` as a single unseen id, plain temperature sampling gives it the
mass of all unseen ids, and a drawn `other` prints as a uniformly drawn unseen id (see
pipeline/model/generation.py).
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import dataclasses
import time

import numpy as np
import torch

from pipeline import accel, cli
from pipeline.config import GenerateConfig, SamplingConfig
from pipeline.errors import UsageError
from pipeline.model.generation import StopStrings, generate, to_text, truncate_at_stop
from pipeline.run import checkpoint


def default() -> GenerateConfig:
    return GenerateConfig()


def greedy() -> GenerateConfig:
    return dataclasses.replace(default(), sampling=SamplingConfig(temperature=0.0))


def nucleus() -> GenerateConfig:
    return dataclasses.replace(default(), sampling=SamplingConfig(temperature=0.8, top_p=0.9))


def beam() -> GenerateConfig:
    return dataclasses.replace(default(), sampling=SamplingConfig(num_beams=4, length_penalty=1.0))


PRESETS = {"default": default, "greedy": greedy, "nucleus": nucleus, "beam": beam}


def unescape(text: str) -> str:
    """Backslash escapes (\\n, \\t, \\u00e9) turned into characters; other characters kept as they are."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def main(cfg: GenerateConfig) -> list[str]:
    if not cfg.model:
        raise UsageError("no model: pass --model EXPORT_DIR (a run's best/ or last/, or the run folder)")
    if cfg.sampling.num_beams > 1 and cfg.num_samples > 1:
        raise UsageError(
            "beam search returns the single most likely continuation; drop --num-samples or --sampling.num-beams"
        )
    accelerator = accel.build_accelerator(cfg.precision)
    export = checkpoint.load_export(cfg.model)
    if not accelerator.is_main_process:
        return []  # generation is one process's job; the others have nothing to do
    device = accelerator.device
    tokenizer, vocab = export.tokenizer, export.vocab

    prompt = unescape(cfg.prompt) or "\n"
    ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)
    prompt_cls = torch.as_tensor(vocab.to_compact(ids), device=device)[None].repeat(cfg.num_samples, 1)
    stops = [unescape(s) for s in cfg.stop]
    stop = StopStrings(stops, tokenizer, vocab) if stops else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model = export.model.to(device, accel.inference_dtype(accelerator.mixed_precision))

    start = time.perf_counter()
    with accelerator.autocast():
        out = generate(model, prompt_cls, cfg.sampling, generator, vocab=vocab, stop=stop)
    accel.synchronize(device)
    elapsed = time.perf_counter() - start

    decode_rng = torch.Generator().manual_seed(cfg.seed)  # which unseen id an `other` prints as
    texts = [truncate_at_stop(to_text(row[len(ids) :], tokenizer, vocab, decode_rng), stops) for row in out]
    for i, text in enumerate(texts):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print((prompt if cfg.show_prompt else "") + text, flush=True)
    new_tokens = int((out[:, len(ids) :] >= 0).sum())
    print(
        f"[{export.path}: {new_tokens} tokens in {elapsed:.2f} s ({new_tokens / max(elapsed, 1e-9):,.0f} tokens/s) "
        f"on {accel.device_description(device)}]",
        file=sys.stderr,
    )
    return texts


if __name__ == "__main__":
    cli.run(main, cli.parse(GenerateConfig, PRESETS))
