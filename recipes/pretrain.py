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

from pipeline import accel, cli
from pipeline.cli import to_dict
from pipeline.config import PretrainConfig
from pipeline.eval.embeddings import make_embedding_probe
from pipeline.eval.probes import make_probe
from pipeline.eval.teacher_forced import evaluate_lm
from pipeline.model.gpt import GPT
from pipeline.run.checkpoint import DataInfo, ExportInfo
from pipeline.run.tracking import Reporter
from pipeline.train import stage
from pipeline.train.batching import plan_batches
from pipeline.train.diagnostics import chain
from pipeline.train.loop import Loop, fit
from pipeline.train.losses import CrossEntropyHead
from teachers import PRESETS


def lm_loss(model, batch):
    """Summed next-token cross-entropy of a (x, y) batch: the loop normalises by target tokens."""
    x, y = batch
    return model(x, head_fn=CrossEntropyHead(y)), {}


def main(cfg: PretrainConfig) -> dict:
    accelerator = accel.build_accelerator(
        cfg.train.precision,
        log_with="tensorboard",
        threads=cfg.train.threads,
        dist_timeout=cfg.train.dist_timeout,
    )

    # Data, vocabulary and the configuration resolved against them (what config.json records).
    data, vocab, data_cfg, model_cfg = stage.resolve_lm(accelerator, cfg.data, cfg.model, cfg.train.progress)
    cfg = dataclasses.replace(cfg, data=data_cfg, model=model_cfg)
    stage.check_sample_prompt(data, cfg.train)
    plan = plan_batches(cfg.train, cfg.data.seq_len, accelerator.num_processes, len(data.train))
    run, resume_from = stage.open_run(accelerator, "pretrain", cfg.preset, cfg.out, cfg.train.resume)
    config = to_dict(cfg) | {"vocab": {"compact": vocab.compact, "classes": vocab.n_classes}}
    stage.check_resume_config(run, config, resume_from, cfg.train.amend)  # before config.json is rewritten

    # The same initial weights on every rank (same seed); a resumed run then loads its state.
    torch.manual_seed(cfg.train.seed)
    initial = stage.init_from_gpt2(  # --init-from: a transformers GPT-2 folder's weights (fresh runs only)
        run, GPT(model_cfg), cfg.init_from, cfg.init_parts, vocab, cfg.data.encoding, resume_from
    )
    model, optimizer, counts = stage.prepare_model(accelerator, initial, cfg.train, cfg.optim)
    expect = {
        "model": dataclasses.asdict(model_cfg),
        "sequences_per_step": plan.sequences_per_step,
        "seq_len": plan.seq_len,
    }
    state = stage.resume_state(accelerator, resume_from, expect)
    run.truncate_metrics(state.step)  # a resumed run logs the steps after its state again
    report = Reporter(accelerator, run, plan.total_steps, state.step, cfg.train.progress)
    ctx = stage.RunContext(accelerator, run, report, data, vocab, plan, "pretrain")
    stage.write_run_files(run, accelerator, config)
    stage.describe_start(ctx, counts, accelerator.unwrap_model(model))

    windows = stage.train_windows(ctx, cfg.train, cfg.data.sampling)
    val = stage.val_batches(ctx, cfg.train)
    clean = stage.clean_train_batches(ctx, cfg.train)  # train windows for the eval-mode train_clean_loss

    def eval_fn() -> dict:
        metrics = evaluate_lm(model, val, accelerator, vocab, data.bytes_per_token)
        if clean:
            train = evaluate_lm(model, clean, accelerator, vocab, data.bytes_per_token, prefix="train_clean")
            metrics["train_clean_loss"] = train["train_clean_loss"]
        return metrics

    info = ExportInfo("teacher", cfg.preset, str(run.path), DataInfo.of(data))
    loop = Loop(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        cfg=cfg.train,
        optim=cfg.optim,
        plan=plan,
        batch_fn=windows.batch,
        loss_fn=lm_loss,
        eval_fn=eval_fn,
        checkpoint_fn=stage.make_checkpointer(ctx, model, model_cfg, info, expect, cfg.train.keep_states),
        report=report,
        probe_fn=chain(
            make_probe(ctx, model, val[0][0][:4], cfg.train),
            make_embedding_probe(ctx, model, cfg.train.projector_tokens),
        ),
        vocab=vocab,
    )
    state = fit(loop, state)
    result = stage.finish(ctx, loop, state, config, counts)
    return result if accelerator.is_main_process else {}


if __name__ == "__main__":
    cli.run(main, cli.parse(PretrainConfig, PRESETS))
