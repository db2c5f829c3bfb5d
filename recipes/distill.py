"""Distill a GPT teacher into a one-attention-head student.

    accelerate launch recipes/distill.py                          # the latest `shakespeare` teacher -> `one_head`
    python recipes/distill.py --teacher EXPORT_DIR --preset NAME --data DIR --out DIR --max-steps N
    python recipes/distill.py --teacher runs/pretrain/char-X/best --preset one_head \\
        --train.precision no --max-steps 200                     # a CPU run on the `char` teacher (its windows)
    python recipes/distill.py --student.init best_head           # the teacher's most important head
    python recipes/distill.py --kd.loss jsd --kd.beta 0.5 --kd.temperature 2
    python recipes/distill.py --kd.cache --kd.top-k 64            # offline teacher top-k log-probs
    python recipes/distill.py --on-policy.fraction 0.5            # GKD: half the batches are the student's own
    python recipes/distill.py --kd.layerwise-steps 40 --kd.hidden-weight 0.5  # layer-wise phase, hidden matching
    python recipes/distill.py --kd.alpha 1 --student.init random  # the same student from scratch (baseline)
    python recipes/distill.py --out runs/x --train.resume auto    # continue where runs/x stopped
    accelerate launch --config_file launch/cpu_ddp.yaml recipes/distill.py --preset tiny --teacher DIR

The scratch baseline is this recipe with `--kd.alpha 1 --student.init random`: the same student,
windows, batches, schedule and evaluation, with the labels as the only signal.

Writes to the run folder: config.json, env.json, metrics.jsonl (loss = total, ce, soft, val_loss,
val_agree_top1, val_kl, ...), result.json, student_init.json (init strategy, key map, head
importance), tb/, states/ (resumable), best/ and last/ (exported students, kind "student").
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
from pipeline.config import require_lr_mults_apply
from pipeline.data.shards import eval_batches
from pipeline.distill import cache as teacher_cache
from pipeline.distill.batches import DistillBatches
from pipeline.distill.config import DistillConfig
from pipeline.distill.objective import DistillLoss, DistillReporter, check_on_policy_supported, make_eval_fn
from pipeline.distill.teacher import (
    check_teacher_corpus,
    check_teacher_data,
    describe_importance,
    distill_data,
    freeze,
    head_importance,
    layer_map,
    with_teacher_windows,
)
from pipeline.errors import UsageError
from pipeline.eval.embeddings import make_embedding_probe
from pipeline.eval.probes import make_probe
from pipeline.eval.teacher_forced import evaluate_lm
from pipeline.model.gpt import GPT
from pipeline.run import checkpoint
from pipeline.run.checkpoint import DataInfo, ExportInfo
from pipeline.run.folder import latest_run_dir
from pipeline.train import stage
from pipeline.train.batching import plan_batches
from pipeline.train.diagnostics import chain
from pipeline.train.loop import Loop, fit
from students import PRESETS, student_model_config
from students.init import check_compatible, chosen_heads, copy_map, init_from_teacher, load_student

DEFAULT_TEACHER = "shakespeare"


def find_teacher(path: str) -> checkpoint.Export:
    """The teacher export: --teacher, else the latest exported `shakespeare` teacher; loaded strictly."""
    if not path:
        run = latest_run_dir("pretrain", DEFAULT_TEACHER, f"best/{checkpoint.WEIGHTS}")
        if run is None:
            raise UsageError(
                f"no exported `{DEFAULT_TEACHER}` teacher under runs/pretrain; train one with "
                f"`accelerate launch recipes/pretrain.py` or pass --teacher EXPORT_DIR"
            )
        path = str(run / "best")
    return checkpoint.load_export(path)


def open_data(accelerator, cfg: DistillConfig, export: checkpoint.Export):
    """The data `distill_data` names (tokenized first where missing), checked against the teacher."""
    data = stage.prepare_data(accelerator, distill_data(cfg.data, export.path), progress=cfg.train.progress)
    check_teacher_data(export, data)
    if not (cfg.data.dir or cfg.data.corpus):  # the teacher's data, as far as we chose it
        check_teacher_corpus(export.path, data)
    return data


def resolve_student(cfg: DistillConfig, export: checkpoint.Export):
    """The student's ModelConfig, after the checks that need the teacher."""
    model_cfg = student_model_config(cfg.student, export.model_cfg)
    require_lr_mults_apply(cfg.optim, model_cfg)  # the student's shape is the teacher's: known only now
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise UsageError(
            f"data.seq_len={cfg.data.seq_len} exceeds the teacher's max_seq_len={model_cfg.max_seq_len}; "
            f"pass --data.seq-len {model_cfg.max_seq_len} (or less)"
        )
    if (cfg.kd.loss == "topk_kl" or cfg.kd.cache) and cfg.kd.top_k >= export.vocab.n_classes:
        raise UsageError(
            f"kd.top_k={cfg.kd.top_k} leaves no tail among the teacher's {export.vocab.n_classes} classes; "
            f"lower --kd.top-k below {export.vocab.n_classes}"
        )
    states = [
        f
        for f, on in (
            ("--kd.layerwise-steps", cfg.kd.layerwise_steps),
            ("--kd.layerwise-share", cfg.kd.layerwise_share),
            ("--kd.hidden-weight", cfg.kd.hidden_weight),
        )
        if on
    ]
    if states and model_cfg.d_model != export.model_cfg.d_model:
        raise UsageError(
            f"{' and '.join(states)} match the student's residual states with the teacher's, which needs the "
            f"teacher's width: student d_model {model_cfg.d_model}, teacher {export.model_cfg.d_model}; "
            f"drop --student.d-model or {' and '.join(states)}"
        )
    try:
        check_compatible(export.model_cfg, model_cfg, cfg.student.init)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return model_cfg


def initial_student(cfg: DistillConfig, model_cfg, export, teacher, accelerator, data) -> tuple[GPT, dict]:
    """The student as init_from_teacher makes it, and what student_init.json records (head importance too)."""
    batches = eval_batches(
        data.val,
        cfg.data.seq_len,
        cfg.student.importance_tokens,
        cfg.train.micro_batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        export.vocab,
    )
    base, scores = head_importance(teacher, batches, accelerator, export.vocab, data.bytes_per_token)
    teacher_state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    state = init_from_teacher(
        cfg.student.init, teacher_state, export.model_cfg, model_cfg, scores, seed=cfg.train.seed
    )
    record = {
        "strategy": cfg.student.init,
        "teacher": str(export.path),
        "layers": layer_map(export.model_cfg.n_layers, model_cfg.n_layers),
        "best_heads": chosen_heads(scores, export.model_cfg, model_cfg),
        "copied": {} if cfg.student.init == "random" else copy_map(export.model_cfg, model_cfg),
        "head_importance": {
            "metric": "teacher val loss increase (nats/token) when the head alone is ablated",
            "tokens": cfg.student.importance_tokens,
            "teacher_val_loss": base,
            "scores": scores.tolist(),
        },
    }
    return load_student(GPT(model_cfg), state), record


def main(cfg: DistillConfig) -> dict:
    accelerator = accel.build_accelerator(
        cfg.train.precision,
        log_with="tensorboard",
        threads=cfg.train.threads,
        dist_timeout=cfg.train.dist_timeout,
    )
    check_on_policy_supported(accelerator, cfg.on_policy.fraction)

    cfg, export, data, model_cfg, cache_at = resolve_inputs(accelerator, cfg)
    plan = plan_batches(cfg.train, cfg.data.seq_len, accelerator.num_processes, len(data.train))
    phase_steps = cfg.kd.layerwise_steps or int(cfg.kd.layerwise_share * plan.total_steps)  # layer-wise phase
    if phase_steps >= plan.total_steps:
        raise UsageError(
            f"kd.layerwise_steps={cfg.kd.layerwise_steps} leaves none of the run's {plan.total_steps} steps "
            f"for end-to-end distillation; lower --kd.layerwise-steps below {plan.total_steps}"
        )
    run, resume_from = stage.open_run(accelerator, "distill", cfg.preset, cfg.out, cfg.train.resume)
    config = to_dict(cfg) | {"student_model": dataclasses.asdict(model_cfg), "vocab": export.vocab.to_json()}
    stage.check_resume_config(run, config, resume_from, cfg.train.amend)  # before config.json is rewritten
    teacher = export.model  # frozen, on the device (resolve_inputs)

    # The student: initialised from the teacher on a fresh run, from the saved state on a resumed one.
    torch.manual_seed(cfg.train.seed)
    if resume_from is None:
        student, init_record = initial_student(cfg, model_cfg, export, teacher, accelerator, data)
        s, flag = cfg.student, "--student.init-from"  # a transformers GPT-2 folder's weights over the init's
        stage.init_from_gpt2(
            run, student, s.init_from, s.init_parts, export.vocab, cfg.data.encoding, None, flag
        )
    else:
        student, init_record = GPT(model_cfg), None
    model, optimizer, counts = stage.prepare_model(accelerator, student, cfg.train, cfg.optim)
    expect = resume_key(cfg, model_cfg, plan)
    state = stage.resume_state(accelerator, resume_from, expect)
    run.truncate_metrics(state.step)  # a resumed run logs the steps after its state again
    report = DistillReporter(accelerator, run, plan.total_steps, state.step, cfg.train.progress)
    ctx = stage.RunContext(
        accelerator, run, report, data, export.vocab, plan, "distill"
    )  # the teacher's vocabulary map
    stage.write_run_files(run, accelerator, config)
    stage.describe_start(ctx, counts, accelerator.unwrap_model(model))
    val = stage.val_batches(ctx, cfg.train)
    clean = stage.clean_train_batches(ctx, cfg.train)  # train windows for the eval-mode train_clean_loss
    teacher_metrics = describe_teacher(ctx, export, teacher, val, init_record)

    cache = None
    if cache_at is not None:
        cache = teacher_cache.prepare(accelerator, *cache_at, export, data, log=report.print)
    windows = stage.train_windows(ctx, cfg.train, cfg.data.sampling)  # grid with a cache (resolve_inputs)
    info = ExportInfo("student", cfg.preset, str(run.path), DataInfo.of(data), teacher=str(export.path),
                      init=cfg.student.init, kd=dataclasses.asdict(cfg.kd))  # fmt: skip
    layers = layer_map(export.model_cfg.n_layers, model_cfg.n_layers)  # teacher layer of each student layer
    loss_fn = DistillLoss(
        accelerator,
        teacher,
        cfg.kd,
        cfg.on_policy,
        layers,
        total_steps=plan.total_steps,
        layerwise_steps=phase_steps,
    )
    loop = Loop(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        cfg=cfg.train,
        optim=cfg.optim,
        plan=plan,
        batch_fn=DistillBatches(windows, cfg.on_policy, cfg.train.seed, cache, phase_steps),
        loss_fn=loss_fn,
        step_fn=loss_fn.at_step,
        eval_fn=make_eval_fn(model, teacher, val, accelerator, ctx.vocab, data.bytes_per_token, clean),
        checkpoint_fn=stage.make_checkpointer(ctx, model, model_cfg, info, expect, cfg.train.keep_states),
        report=report,
        probe_fn=chain(
            make_probe(ctx, model, val[0][0][:4], cfg.train),
            make_embedding_probe(ctx, model, cfg.train.projector_tokens),
        ),
        vocab=ctx.vocab,
    )
    state = fit(loop, state)
    teacher_line = (
        f"teacher: val loss {teacher_metrics['teacher_val_loss']:.4f} on the same {cfg.train.eval_tokens:,} val "
        f"tokens (the student's best: {state.best_val:.4f}, {state.best_val - teacher_metrics['teacher_val_loss']:+.4f})"
    )
    result = stage.finish(
        ctx,
        loop,
        state,
        config,
        counts,
        distill_result(loop, export, teacher_metrics, cache),
        (teacher_line,),
    )
    return result if accelerator.is_main_process else {}


def resolve_inputs(accelerator, cfg: DistillConfig):
    """Teacher (frozen, on the device), data, the student's shape and the cache's place: every mismatch is an
    error before any work.

    Returns the configuration as config.json records it (teacher and data folder resolved) with them.
    """
    export = find_teacher(cfg.teacher)
    cfg = without_phase_from_scratch(cfg, accelerator.print)
    cfg = with_teacher_windows(cfg, export.path)  # data.seq_len / train.micro_batch_size 0: the teacher's
    data = open_data(accelerator, cfg, export)
    stage.check_sample_prompt(data, cfg.train)
    model_cfg = resolve_student(cfg, export)
    cache_at = locate_cache(cfg, export, data)
    data_cfg = dataclasses.replace(cfg.data, dir=str(data.dir), encoding=data.meta["encoding"])
    if cache_at is not None and data_cfg.sampling != "grid":  # cached outputs belong to fixed windows
        accelerator.print(
            f"data.sampling: grid, not {data_cfg.sampling}: the teacher cache holds a grid of windows"
        )
        data_cfg = dataclasses.replace(data_cfg, sampling="grid")
    cfg = dataclasses.replace(cfg, teacher=str(export.path), data=data_cfg)
    freeze(export.model).to(accelerator.device)  # no DDP wrapper, no optimizer
    stage.choose_attention_kernel(accelerator, export.model, cfg.train.attention_kernel)  # it runs every step
    return cfg, export, data, model_cfg, cache_at


def without_phase_from_scratch(cfg: DistillConfig, log=print) -> DistillConfig:
    """A scratch run (kd.alpha 1, no teacher) drops a preset's layer-wise share, which needs the teacher.

    So `--kd.alpha 1 --student.init random` stays the same student's scratch baseline under a preset
    with a layer-wise phase; config.json records the share as 0. An explicit --kd.layerwise-steps with
    alpha 1 is refused by DistillConfig.
    """
    kd = cfg.kd
    if kd.uses_teacher or not kd.layerwise_share:
        return cfg
    log(
        f"kd.alpha=1 trains without the teacher: no layer-wise phase (kd.layerwise_share {kd.layerwise_share} -> 0)"
    )
    return dataclasses.replace(cfg, kd=dataclasses.replace(kd, layerwise_share=0.0))


def locate_cache(cfg: DistillConfig, export: checkpoint.Export, data) -> tuple | None:
    """--kd.cache: the teacher cache's folder and key, checked before any work (None without the cache)."""
    if not cfg.kd.cache:
        return None
    return teacher_cache.locate(
        export, data, cfg.data.seq_len, cfg.kd.top_k, cfg.kd.temperature, cfg.kd.cache_dir
    )


def resume_key(cfg: DistillConfig, model_cfg, plan) -> dict:
    """What a resumable state must match to be continued by this run."""
    return {
        "model": dataclasses.asdict(model_cfg),
        "sequences_per_step": plan.sequences_per_step,
        "seq_len": plan.seq_len,
        "teacher": cfg.teacher,
        "kd": dataclasses.asdict(cfg.kd),
        "on_policy": dataclasses.asdict(cfg.on_policy),
    }


def distill_result(loop: Loop, export: checkpoint.Export, teacher_metrics: dict, cache) -> dict:
    """The distill stage's entries of result.json, beside the training loop's."""
    return {
        "final_val_agree_top1": loop.last_eval.get("val_agree_top1"),
        "final_val_kl": loop.last_eval.get("val_kl"),
        "teacher": {"path": str(export.path), **teacher_metrics},
        "teacher_cache": None if cache is None else {"path": str(cache.path), "bytes": cache.nbytes},
    }


def describe_teacher(
    ctx: stage.RunContext, export: checkpoint.Export, teacher: GPT, val: list, init_record
) -> dict:
    """The teacher's shape and val loss, and the student's initialisation (head importance too); the teacher's metrics."""
    report, run = ctx.report, ctx.run
    metrics = evaluate_lm(
        teacher, val, ctx.accelerator, ctx.vocab, ctx.data.bytes_per_token, prefix="teacher_val"
    )
    cfg = export.model_cfg
    report.print(
        f"teacher: {export.path} ({cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}); "
        f"val loss {metrics['teacher_val_loss']:.4f}, bpb {metrics['teacher_val_bpb']:.4f}"
    )
    # Single numbers go to the Text dashboard (a scalar card with one point shows nothing).
    rows = "\n".join(f"| {k.removeprefix('teacher_val_')} | {v:.4f} |" for k, v in metrics.items())
    report.markdown(
        "run/teacher", f"teacher `{export.path}`\n\n| val metric | value |\n| --- | --- |\n{rows}"
    )
    if init_record is not None:
        run.write("student_init.json", init_record)
        scores = torch.tensor(init_record["head_importance"]["scores"])
        report.markdown("run/head_importance", importance_markdown(scores, init_record["strategy"]))
        report.print(f"student init: {init_record['strategy']}; {describe_importance(scores)}")
    return metrics


def importance_markdown(scores: torch.Tensor, strategy: str) -> str:
    """The teacher's head importance as a (layer x head) markdown table, for the text card run/head_importance."""
    heads = scores.shape[1]
    header = "| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |"
    rule = "| --- " * (heads + 1) + "|"
    body = "\n".join(
        f"| {layer} | " + " | ".join(f"{v:+.4f}" for v in row.tolist()) + " |"
        for layer, row in enumerate(scores)
    )
    return (
        f"Teacher val-loss increase (nats/token) when each head alone is ablated; student init `{strategy}`.\n\n"
        f"{header}\n{rule}\n{body}"
    )


if __name__ == "__main__":
    cli.run(main, cli.parse(DistillConfig, PRESETS))
