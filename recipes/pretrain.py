"""Pretrain a GPT teacher.

    accelerate launch recipes/pretrain.py                         # the `shakespeare` teacher
    python recipes/pretrain.py --preset char                      # nanoGPT's shakespeare_char CPU recipe
    python recipes/pretrain.py --preset seed --max-steps 50       # the exercise sheet's model
    python recipes/pretrain.py --preset NAME --data DIR --out DIR --max-steps N
    python recipes/pretrain.py --config my.toml --optim.lr 3e-4   # config file, then dotted overrides
    python recipes/pretrain.py --out runs/x --train.resume auto   # continue where runs/x stopped
    accelerate launch --config_file launch/cpu_ddp.yaml recipes/pretrain.py --preset tiny   # 2 CPU processes

Writes to the run folder: config.json, env.json, metrics.jsonl, result.json, tb/ (TensorBoard),
states/ (resumable), best/ and last/ (exported models). `tensorboard --logdir runs` shows it all.
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import dataclasses

import torch

from pipeline import accel, cli, stage
from pipeline.cli import to_dict
from pipeline.config import PretrainConfig
from pipeline.data import TrainWindows, eval_batches
from pipeline.evaluation import evaluate_lm
from pipeline.losses import CrossEntropyHead
from pipeline.model import GPT
from pipeline.optim import build_optimizer
from pipeline.tracking import Reporter
from pipeline.train import Loop, fit, plan_batches
from pipeline.vocab import VocabMap
from teachers import PRESETS


def lm_loss(model, batch):
    """Summed next-token cross-entropy of a (x, y) batch: the loop normalises by target tokens."""
    x, y = batch
    return model(x, head_fn=CrossEntropyHead(y)), {}


def main(cfg: PretrainConfig) -> dict:
    accelerator = accel.build_accelerator(cfg.train.precision, log_with="tensorboard")
    main_process = accelerator.is_main_process

    # Data, vocabulary and the resolved configuration (what config.json records).
    data = stage.prepare_data(accelerator, cfg.data, progress=cfg.train.progress)
    vocab = VocabMap.from_meta(data.meta, cfg.data.compact_vocab)
    model_cfg = stage.resolve_model_config(cfg.model, data, vocab)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, dir=str(data.dir), encoding=data.meta["encoding"]),
        model=model_cfg,
    )
    plan = plan_batches(cfg.train, cfg.data.seq_len, accelerator.num_processes, len(data.train))
    run, resume_from = stage.open_run(accelerator, "pretrain", cfg.preset, cfg.out, cfg.train.resume)

    # Model and optimizer: the same initial weights on every rank (same seed).
    torch.manual_seed(cfg.train.seed)
    model = GPT(model_cfg)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    counts = model.param_counts()
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        model = torch.compile(model)

    expect = {
        "model": dataclasses.asdict(model_cfg),
        "sequences_per_step": plan.sequences_per_step,
        "seq_len": plan.seq_len,
    }
    state = stage.resume_state(accelerator, resume_from, expect)
    report = Reporter(accelerator, run, plan.total_steps, state.step, cfg.train.progress)
    stage.write_run_files(
        run, accelerator, to_dict(cfg) | {"vocab": {"compact": vocab.compact, "classes": vocab.n_classes}}
    )
    report.print(f"run folder: {run.path}")
    report.print(
        f"device: {accel.device_description(accelerator.device)}, precision {accelerator.mixed_precision}"
    )
    report.print(
        f"data: {data.dir} ({data.meta['encoding']}, {len(data.train):,} train / {len(data.val):,} val tokens)"
    )
    report.print(
        f"vocabulary: {vocab.n_classes:,} output classes"
        + (
            f" ({vocab.n_classes - 1:,} ids seen in train + other, of {vocab.full_size:,})"
            if vocab.compact
            else ""
        )
    )
    report.print(
        "parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + f" ({counts['total'] / 1e6:.1f}M)"
    )
    report.print(plan.describe())
    report.scalars(0, {f"params/{k}": v for k, v in counts.items()}, record=False)

    windows = TrainWindows(
        data.train,
        plan.seq_len,
        plan.micro_batch_size,
        plan.grad_accum_steps,
        cfg.train.seed,
        accelerator.process_index,
        accelerator.num_processes,
        vocab,
    )
    val = eval_batches(
        data.val,
        plan.seq_len,
        cfg.train.eval_tokens,
        plan.micro_batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        vocab,
    )
    tokenizer = data.tokenizer
    info = {"kind": "teacher", "preset": cfg.preset, "run": str(run.path), "data": stage.data_info(data)}
    loop = Loop(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        cfg=cfg.train,
        optim=cfg.optim,
        plan=plan,
        batch_fn=windows.batch,
        loss_fn=lm_loss,
        eval_fn=lambda: evaluate_lm(model, val, accelerator, vocab, data.bytes_per_token),
        checkpoint_fn=stage.make_checkpointer(
            accelerator, run, model, model_cfg, tokenizer, vocab, info, expect, cfg.train.keep_states
        ),
        report=report,
        probe_fn=stage.make_probe(
            accelerator,
            model,
            report,
            val[0][0][:4],
            tokenizer,
            vocab,
            cfg.train.sample_prompt,
            cfg.train.sample_tokens,
            cfg.train.seed,
        ),
    )
    state = fit(loop, state)

    result = {
        "step": state.step,
        "tokens": state.tokens,
        "epochs": plan.epoch(state.step),
        "wall_time_s": state.elapsed,
        "tokens_per_s": state.tokens / max(state.elapsed, 1e-9),
        "best_val_loss": state.best_val,
        "best_step": state.best_step,
        "final_val_loss": loop.last_eval.get("val_loss"),
        "final_val_bpb": loop.last_eval.get("val_bpb"),
        "stopped_early": state.stopped_early,
        "skipped_steps": state.skipped_steps,
        "final": loop.last_eval,
        "parameters": counts,
        "peak_mem_gib": accel.peak_memory_gib(accelerator.device),
        "noise_scale": loop.grad_noise.result() if loop.grad_noise is not None else None,
    }
    stage.write_projector(
        report,
        accelerator.unwrap_model(model),
        data,
        tokenizer,
        vocab,
        cfg.train.projector_tokens,
        state.step,
    )
    report.hparams(to_dict(cfg), {"best_val_loss": state.best_val, **loop.last_eval})
    run.write_result(result)
    report.print(
        f"done: {state.step:,} steps, {state.tokens:,} tokens in {state.elapsed:.0f} s "
        f"({result['tokens_per_s']:,.0f} tokens/s); best val loss {state.best_val:.4f} at step {state.best_step}"
        f"; exports in {run.path / 'best'} and {run.path / 'last'}"
    )
    report.close()
    return result if main_process else {}


if __name__ == "__main__":
    cli.run(main, cli.parse(PretrainConfig, PRESETS))
