"""Gradient/update statistics, clipping share, the step-0 evaluation, the clean train loss and embedding geometry (issue 13)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import read_jsonl, run_recipe

from pipeline.config import ModelConfig, OptimConfig, TrainConfig
from pipeline.data.shards import TokenData, eval_batches
from pipeline.data.vocab import VocabMap
from pipeline.eval.embeddings import cosine_matrix, effective_rank, nn_cosine, position_table
from pipeline.eval.teacher_forced import evaluate_lm
from pipeline.model.gpt import GPT
from pipeline.run.checkpoint import load_export
from pipeline.run.folder import RunDir
from pipeline.train.batching import plan_batches
from pipeline.train.diagnostics import weight_stats
from pipeline.train.loop import Loop, TrainState, fit
from pipeline.train.losses import CrossEntropyHead
from pipeline.train.optim import build_optimizer

VOCAB = 11
TINY = ModelConfig(n_layers=2, n_heads=2, d_model=16, max_seq_len=8, vocab_size=VOCAB)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (2, 8), generator=g), torch.randint(0, VOCAB, (2, 8), generator=g)


def _lm_loss(model, batch):
    x, y = batch
    return model(x, head_fn=CrossEntropyHead(y)), {}


# --------------------------------------------------------------------------------------------------
# The update/weight ratio reconstructed from AdamW's state equals the weights' actual change
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_update_ratio_equals_a_brute_force_copy(fused):
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = GPT(TINY)
    optim = OptimConfig(lr=3e-3, weight_decay=0.1, warmup_steps=0, lr_mult_tok_emb=2.0)
    model, optimizer = acc.prepare(model, build_optimizer(model, optim, fused=fused))
    for step in range(3):  # past the first step, where bias correction is largest
        before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
        model(_batch(step)[0], head_fn=CrossEntropyHead(_batch(step)[1])).backward()
        optimizer.step()
        stats = weight_stats(optimizer, stepped=True)
        delta, old = {}, {}
        for group, saved in zip(optimizer.param_groups, before):
            part = group["part"]
            for p, w0 in zip(group["params"], saved):
                delta[part] = delta.get(part, 0.0) + float((p.detach() - w0).double().pow(2).sum())
                old[part] = old.get(part, 0.0) + float(w0.double().pow(2).sum())
        for part in delta:
            brute = math.sqrt(delta[part]) / math.sqrt(old[part])
            assert stats[f"update_ratio/{part}"].item() == pytest.approx(brute, rel=1e-3), part
            assert brute > 0
        optimizer.zero_grad(set_to_none=True)
    assert weight_stats(optimizer, stepped=False)["update_ratio/ffn"].item() == 0.0  # a skipped step


# --------------------------------------------------------------------------------------------------
# Through the real loop: clipped share, the gradient statistics and the step-0 evaluation
# --------------------------------------------------------------------------------------------------


class _Report:
    """The Reporter's interface without TensorBoard: scalars and messages kept."""

    def __init__(self, path: Path) -> None:
        self.run = RunDir(path)
        self.messages: list[str] = []
        self.records: list[tuple[int, dict]] = []
        self.cards: list[tuple[str, str]] = []  # text cards (tag, markdown)

    def print(self, message: str) -> None:
        self.messages.append(message)

    def progress(self, step: int, **postfix) -> None:
        pass

    def scalars(self, step: int, values: dict, record: bool = True) -> None:
        self.records.append((step, dict(values)))

    def histograms(self, model, step: int) -> None:
        pass

    def markdown(self, tag: str, text: str, step: int = 0) -> None:
        self.cards.append((tag, text))


def _fit(tmp_path: Path, grad_clip: float, state: TrainState | None = None, **train):
    torch.manual_seed(0)
    cfg = TrainConfig(
        **{"max_steps": 6, "micro_batch_size": 2, "log_interval": 3, "eval_interval": 100} | train
    )
    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=grad_clip)
    acc = Accelerator(cpu=True)
    model = GPT(TINY)
    model, optimizer = acc.prepare(model, build_optimizer(model, optim, fused=False))
    fixed = [_batch(1000 + i) for i in range(4)]

    @torch.no_grad()
    def eval_fn() -> dict[str, float]:
        model.eval()
        loss = sum(float(_lm_loss(model, b)[0]) for b in fixed) / (4 * 2 * 8)
        model.train()
        return {"val_loss": loss}

    probed: list[int] = []
    report = _Report(tmp_path)
    loop = Loop(
        acc, model, optimizer, cfg, optim, plan_batches(cfg, 8, 1, 10_000),
        lambda step, micro: _batch(step), _lm_loss, eval_fn,
        checkpoint_fn=lambda state, improved, final: None, report=report, probe_fn=probed.append,
    )  # fmt: skip
    return fit(loop, state or TrainState()), report, probed


def _logged(report: _Report, key: str) -> list[float]:
    return [values[key] for _, values in report.records if key in values]


def test_clipped_share_counts_clipped_steps_and_is_zero_without_clipping(tmp_path):
    _, clipped, _ = _fit(tmp_path / "a", grad_clip=1e-6)
    assert _logged(clipped, "clipped_share") == [1.0, 1.0]
    _, free, _ = _fit(tmp_path / "b", grad_clip=0.0)
    assert _logged(free, "clipped_share") == [0.0, 0.0]
    record = next(values for step, values in free.records if step == 3)
    for part in ("tok_emb", "pos_emb", "attention", "ffn", "norm", "head"):
        assert record[f"grad_rms/{part}"] > 0 and record[f"weight_norm/{part}"] > 0
        assert record[f"update_ratio/{part}"] > 0
    assert record["grad_rms_touched/tok_emb"] >= record["grad_rms/tok_emb"]
    layers = [record[f"grad_norm_layer/layer{i}"] for i in range(TINY.n_layers)]
    assert all(v > 0 for v in layers) and "grad_norm_layer/layer2" not in record
    # Pre-clip: the clipped run's RMS is its logged pre-clip group norm over sqrt(numel), not the clipped one.
    first = next(values for step, values in clipped.records if step == 3)
    counts = GPT(TINY).param_counts()
    for part in ("attention", "ffn", "head"):
        expected = first[f"grad_norm/{part}"] / math.sqrt(counts[part])
        assert first[f"grad_rms/{part}"] == pytest.approx(expected, rel=1e-4) and expected > 1e-3


def test_step_zero_evaluation_on_a_fresh_run_only(tmp_path):
    state, report, probed = _fit(tmp_path / "fresh", grad_clip=1.0)
    assert probed[0] == 0
    start = [text for tag, text in report.cards if tag == "run/step0"]  # one text card, no one-point scalars
    assert len(start) == 1 and abs(state.initial_val_loss - math.log(VOCAB)) < 0.5
    assert f"| val_loss | {state.initial_val_loss:.4f} |" in start[0]
    assert f"| ln_vocab | {math.log(VOCAB):.4f} |" in start[0] and state.ln_vocab == pytest.approx(
        math.log(VOCAB)
    )
    line = next(m for m in report.messages if m.startswith("step 0:"))
    assert f"ln V = {math.log(VOCAB):.4f} (uniform over {VOCAB} classes)" in line
    # A resumed run (step > 0) neither evaluates nor probes at step 0 again, and keeps the state's values.
    resumed = TrainState(step=3, initial_val_loss=2.5, ln_vocab=math.log(VOCAB))
    state, report, probed = _fit(tmp_path / "resumed", grad_clip=1.0, state=resumed)
    assert 0 not in probed and not any(m.startswith("step 0:") for m in report.messages)
    assert not any(step == 0 for step, _ in report.records) and state.initial_val_loss == 2.5
    _, report, probed = _fit(tmp_path / "off", grad_clip=1.0, eval_at_start=False)
    assert 0 not in probed and not any(step == 0 for step, _ in report.records)


# --------------------------------------------------------------------------------------------------
# Embedding geometry: pure functions
# --------------------------------------------------------------------------------------------------


def test_effective_rank_and_nearest_neighbour_cosine():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-5)
    assert effective_rank(torch.eye(7, 12) * 3.0) == pytest.approx(7.0, rel=1e-5)
    assert effective_rank(torch.ones(5, 4)) == pytest.approx(1.0, rel=1e-4)  # rank one
    rows = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert nn_cosine(torch.cat([rows, 2 * rows])) == pytest.approx(1.0, abs=1e-6)  # every row has a twin
    assert nn_cosine(torch.eye(5)) == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(cosine_matrix(rows).diagonal(), torch.ones(6))


def test_position_table_per_position_kind():
    learned = GPT(TINY)
    assert torch.equal(position_table(learned), learned.pos_emb.weight)
    sinus = position_table(GPT(ModelConfig(**{**TINY.__dict__, "positions": "sinusoidal"})))
    assert sinus.shape == (TINY.max_seq_len, TINY.d_model)
    sim = cosine_matrix(sinus)
    assert sim[0, 1] > sim[0, 7]  # nearby positions are more alike than distant ones
    for kind in ("rope", "alibi", "none"):
        assert position_table(GPT(ModelConfig(**{**TINY.__dict__, "positions": kind}))) is None


# --------------------------------------------------------------------------------------------------
# End to end: the recipe's result.json, metrics.jsonl and TensorBoard tags
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diag_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "run"
    args = ("--preset", "tiny", "--data", str(char_data), "--out", str(out), "--train.precision", "no")
    proc = run_recipe(
        "pretrain", *args, "--train.no-progress", "--max-steps", "6", "--train.eval-interval", "3",
        "--train.log-interval", "3", "--model.dropout", "0.2", "--optim.grad-clip", "1e-6",
        "--train.projector-tokens", "20",
    )  # fmt: skip
    return out, proc


def test_recipe_records_step_zero_and_clean_train_loss(diag_run, char_data):
    out, proc = diag_run
    result = json.loads((out / "result.json").read_text())
    vocab = json.loads((out / "config.json").read_text())["vocab"]["classes"]
    assert result["ln_vocab"] == pytest.approx(math.log(vocab))
    assert abs(result["initial_val_loss"] - math.log(vocab)) < 0.5
    assert f"step 0: val loss {result['initial_val_loss']:.4f}; ln V = {math.log(vocab):.4f}" in proc.stdout
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]  # the step-0 evaluation goes to result.json and run/step0
    assert all(r["clipped_share"] == 1.0 for r in records)
    # train_clean_loss: the exported final weights in eval mode on the first eval-tokens of train.
    data = TokenData.open(char_data)
    meta_vocab = VocabMap.from_meta(
        data.meta, json.loads((out / "config.json").read_text())["data"]["compact_vocab"]
    )
    export = load_export(out / "last")
    windows = eval_batches(data.train, 32, 1024, 4, 0, 1, meta_vocab)
    direct = evaluate_lm(export.model, windows, Accelerator(cpu=True), meta_vocab, data.bytes_per_token)
    assert records[-1]["train_clean_loss"] == pytest.approx(direct["val_loss"], rel=1e-6)
    assert result["final"]["train_clean_loss"] == records[-1]["train_clean_loss"]


def test_tensorboard_holds_the_diagnostic_tags(diag_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = diag_run
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "grad_rms/tok_emb", "grad_rms/attention", "grad_rms_touched/tok_emb", "weight_norm/ffn",
        "update_ratio/attention", "update_ratio/head", "grad_norm_layer/layer0", "grad_norm_layer/layer1",
        "train/clipped_share", "Loss/train_clean",
        "embedding/nn_cosine", "embedding/effective_rank",
    }  # fmt: skip
    assert expected <= scalars, expected - scalars
    assert [e.step for e in events.Scalars("embedding/effective_rank")] == [0, 3, 6]
    assert not any(t.startswith("init/") for t in scalars)  # step 0's single numbers: the text card
    step0 = events.Tensors("run/step0/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| val_loss |" in step0 and "| train_clean_loss |" in step0 and "| ln_vocab |" in step0
    assert [e.step for e in events.Images("embedding/position_similarity")] == [0, 3, 6]
    projector = (out / "tb" / "projector_config.pbtxt").read_text()
    names = [line.split('"')[1] for line in projector.splitlines() if "tensor_name" in line]
    assert names == ["token_embedding:00000", "token_embedding:00003", "token_embedding:00006"]
    rank = events.Scalars("embedding/effective_rank")[-1].value
    assert 1.0 <= rank <= 20.0 and np.isfinite(rank)


def test_tensorboard_tags_put_the_losses_first():
    from pipeline.run.tracking import tag

    assert [tag(k) for k in ("loss", "val_loss", "train_clean_loss")] == [
        "Loss/train",
        "Loss/val",
        "Loss/train_clean",
    ]
    assert tag("val_bpb") == "Val/bpb" and tag("lr") == "train/lr" and tag("train_x") == "train/x"
    assert tag("grad_norm/ffn") == "grad_norm/ffn"  # explicit groups stay
    assert tag("ce", {"ce": "Loss/train"}) == "Loss/train"  # a stage's renames come first
    # TensorBoard sorts groups case-sensitively (capitals first) and opens the first two: Loss, Val.
    groups = sorted(
        {tag(k).split("/")[0] for k in ("loss", "val_loss", "val_bpb", "lr", "attention/x", "grad_norm/y")}
    )
    assert groups[:2] == ["Loss", "Val"]


def test_hparams_rows_share_their_keys_and_put_shape_and_lr_first():
    from pipeline.train.batching import plan_batches
    from pipeline.train.stage import run_hparams

    plan = plan_batches(TrainConfig(micro_batch_size=4, max_steps=10), 32, 1, 10_000)
    teacher = run_hparams(
        {"preset": "tiny", "optim": {"lr": 1e-3}, "data": {"encoding": "char"}}, TINY, plan, "no"
    )
    student_cfg = {
        "preset": "tiny",
        "optim": {"lr": 2e-3},
        "student": {"init": "copy"},
        "kd": {"alpha": 0.5, "loss": "jsd"},
    }
    student = run_hparams(student_cfg, ModelConfig(n_layers=1, n_heads=1, d_model=32), plan, "no")
    assert set(teacher) == set(student)  # one table for teachers and students
    assert sorted(teacher)[:5] == [
        "d_model",
        "lr",
        "n_heads",
        "n_layers",
        "positions",
    ]  # the columns TB ticks
    assert teacher["student_init"] == "scratch" and teacher["student_kd_alpha"] == 1.0
    assert student["student_kd_loss"] == "jsd" and student["lr"] == 2e-3 and student["tokens_per_step"] == 128


def test_train_compile_builds_one_graph_and_never_recompiles(tmp_path, monkeypatch):
    """--train.compile compiles the training step only: evaluations (eval mode, other shapes) run the eager module."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # a recompile fails the run
    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend="eager")
    )  # dynamo only: fast
    state, _, probed = _fit(tmp_path, grad_clip=1.0, eval_interval=2, compile=True)
    assert state.step == 6 and probed == [0, 2, 4, 6]  # four evaluations and probes between the steps
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the training forward, once
