"""The evaluate and generate recipes end to end, on tiny models trained for a few steps."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import accelerate_launch, run_recipe

from pipeline.config import TokenizeConfig
from pipeline.data import tokenize
from pipeline.eval.results import ModelResult

N_NEW = 16  # the quick preset's new_tokens


@pytest.fixture(scope="module")
def exports(char_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny runs on the same data: the `tiny` teacher and a one-head RoPE variant."""
    root = tmp_path_factory.mktemp("eval-models")
    common = ["--preset", "tiny", "--data", str(char_data), "--max-steps", "10", "--train.no-progress"]
    run_recipe("pretrain", *common, "--out", str(root / "teacher"))
    run_recipe(
        "pretrain",
        *common,
        "--out",
        str(root / "onehead"),
        "--model.positions",
        "rope",
        "--model.n-heads",
        "1",
    )
    return root / "teacher", root / "onehead"


@pytest.fixture(scope="module")
def evaluation(exports, char_data, tmp_path_factory) -> Path:
    """The quick evaluation of both models; what it printed is in ../stdout.txt."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    teacher, student = exports
    args = ["--models", str(teacher), str(student / "best"), "--data", str(char_data), "--out", str(out)]
    proc = run_recipe("evaluate", *args, "--preset", "quick", "--no-progress")
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


def test_metrics_json_holds_the_contract_keys_with_sensible_values(evaluation, exports):
    data = json.loads((evaluation / "metrics.json").read_text())
    assert list(data["models"]) == ["teacher", "onehead"]  # run folder names; best/ resolves to its run
    pretrain_val = json.loads((exports[0] / "result.json").read_text())["best_val_loss"]
    for name, m in data["models"].items():
        for key in ("val_loss", "bits_per_byte", "top1_acc", "accuracy_by_position", "survival_by_position"):
            assert key in m, (name, key)
        assert m["bits_per_byte"] == pytest.approx(
            m["val_loss"] / math.log(2), rel=1e-6
        )  # ASCII: 1 byte/token
        assert 0 < m["top1_acc"] < 1 and 0 <= m["wer"]
        a, s = m["accuracy_by_position"], m["survival_by_position"]
        assert len(a) == len(s) == N_NEW and all(0 <= v <= 1 for v in a)
        assert (
            s[0] == a[0]
            and all(s[k] <= s[k - 1] for k in range(1, N_NEW))
            and all(sv <= av for sv, av in zip(s, a))
        )
        hist = m["first_divergence_histogram"]
        assert sum(hist) == m["prompts"] == 24
        mean = sum(k * c for k, c in enumerate(hist, start=1)) / sum(hist)
        assert m["first_divergence_mean"] == pytest.approx(mean)
        assert 1 <= m["first_divergence_mean"] <= N_NEW + 1
        assert (
            m["first_divergence_mean_ci"][0] <= m["first_divergence_mean"] <= m["first_divergence_mean_ci"][1]
        )
        assert m["exposure_gap"]["gap"][0] == pytest.approx(0.0, abs=1e-6)
        assert len(m["independence_prediction"]) == N_NEW and "sampled" in m
        assert len(m["attention"]["entropy"]) == 2  # layers
        lp = m["loss_by_position"]  # also without extrapolation: does loss fall with context?
        assert lp["seq_len"] == lp["trained_max_seq_len"] == 32 and not lp["extrapolated"]
        assert [b["start"] for b in lp["buckets"]] == [0, 1, 2, 4, 8, 16] and len(lp["per_position"]) == 32
        assert sum(b["tokens"] for b in lp["buckets"]) == m["val_tokens"]
        assert set(m["rollout_confidence"]) == {"greedy", "sampled", "nucleus", "beam"}
    assert data["models"]["teacher"]["val_loss"] == pytest.approx(pretrain_val, abs=0.15)
    for m in data["models"].values():  # the typed record reads metrics.json back and writes it unchanged
        assert ModelResult.from_json(m).to_json() == m
    # The first model is a teacher export and others follow: it judges them all, itself trivially.
    assert data["context"]["judge"] == "teacher"
    assert data["models"]["teacher"]["judge"]["agreement_data"] == 1.0
    assert 0 <= data["models"]["onehead"]["judge"]["agreement_rollout"] < 1


def test_report_answers_first_and_embeds_existing_pngs(evaluation):
    report = (evaluation / "report.md").read_text()
    answer = report.split("## The answer", 1)[1].split("##", 1)[0]
    assert "drifts soonest" in answer and "**teacher**" in answer and "**onehead**" in answer
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {"accuracy_by_position", "survival", "first_divergence", "exposure_gap", "attention_entropy"}
    expected |= {"rollout_confidence", "loss_by_position"}
    assert expected | {"attention_maps", "samples"} == {Path(i).stem for i in images}
    for image in images:
        png = evaluation / image
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_run_folder_describes_itself(evaluation):
    for name in ("config.json", "env.json", "result.json", "metrics.jsonl"):
        assert (evaluation / name).is_file(), name
    config = json.loads((evaluation / "config.json").read_text())
    assert config["new_tokens"] == N_NEW and config["resolved"]["prompts"] == 24
    assert "git_sha" in json.loads((evaluation / "env.json").read_text())
    result = json.loads((evaluation / "result.json").read_text())
    assert set(result["models"]) == {"teacher", "onehead"}
    for name in ("teacher", "onehead"):  # one TensorBoard run per model, so curves overlay
        assert list((evaluation / "tb" / name).glob("events.out.tfevents.*"))
    assert list((evaluation / "tb").glob("events.out.tfevents.*"))  # plots and the report


def test_bad_input_is_refused_before_any_work(exports, evaluation, tmp_path):
    other = tmp_path / "other-data"
    corpus = tmp_path / "other.txt"
    corpus.write_text("xyz zyx " * 2000)
    tokenize.tokenize(
        TokenizeConfig(input=str(corpus), encoding="char", out=str(other)), log=lambda _: None, progress=False
    )
    cases = {
        "uses the tokenizer char": ["--models", str(exports[0]), "--data", str(other)],
        "no models to evaluate": [],
        "already holds an evaluation": ["--models", str(exports[0]), "--out", str(evaluation)],
    }
    for message, args in cases.items():
        proc = run_recipe("evaluate", *args, "--preset", "quick", check=False)
        assert proc.returncode == 2, (message, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr


def test_two_processes_give_the_same_greedy_metrics(exports, char_data, evaluation, tmp_path):
    out = tmp_path / "ddp"
    teacher, student = exports
    args = ["--models", str(teacher), str(student), "--data", str(char_data), "--out", str(out)]
    run_recipe(
        "evaluate", *args, "--preset", "quick", "--no-progress", launcher=accelerate_launch("cpu_ddp.yaml")
    )
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    one = json.loads((evaluation / "metrics.json").read_text())["models"]
    two = json.loads((out / "metrics.json").read_text())["models"]
    for name in one:
        for key in ("accuracy_by_position", "survival_by_position", "first_divergence_mean", "wer"):
            assert two[name][key] == pytest.approx(one[name][key], abs=1e-6), (name, key)
        assert two[name]["val_loss"] == pytest.approx(one[name]["val_loss"], abs=0.05)


def test_generate_recipe_prints_repeatable_text(exports):
    model = str(exports[0])
    greedy = ["--model", model, "--prompt", "ROMEO:", "--preset", "greedy", "--sampling.max-new-tokens", "12"]
    first = run_recipe("generate", *greedy).stdout
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) == len("ROMEO:") + 12  # char tokens
    assert run_recipe("generate", *greedy).stdout == first
    sampled = run_recipe(
        "generate", "--model", model, "--seed", "3", "--num-samples", "2", "--stop", "e", "--no-show-prompt"
    ).stdout
    samples = sampled.split("--- sample ")[1:]
    assert len(samples) == 2 and all("e" not in s.split("\n", 1)[1] for s in samples)


# --------------------------------------------------------------------------------------------------
# What a newcomer sees: names, TensorBoard tags, figures, printed figures (issue 14)
# --------------------------------------------------------------------------------------------------

# Tag groups the training stages write that a 10-step tiny pretrain may not (distill's, the noise scale).
TRAINING_GROUPS = {
    "Loss",
    "Val",
    "train",
    "val",
    "attention",
    "heads",
    "teacher",
    "head_importance",
    "noise",
    "init",
    "params",
}


def tb_tags(log_dir: Path) -> dict[str, list[str]]:
    """TensorBoard tags of one run folder (its own events only, not its subfolders'), by kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_evaluate_tags_stay_apart_from_training_tags_and_are_not_repeated(evaluation, exports):
    training = {tag.split("/")[0] for tag in tb_tags(exports[0] / "tb")["scalars"]}
    assert {"Loss", "Val", "train", "attention"} <= training  # what the pretrain run wrote
    training |= TRAINING_GROUPS
    names = ["teacher", "onehead"]
    per_model = {name: tb_tags(evaluation / "tb" / name) for name in names}
    for name, tags in per_model.items():
        scalars = tags["scalars"]
        groups = {tag.split("/")[0] for tag in scalars}
        assert not groups & training, (name, groups & training)  # no stray evaluate point on a training card
        assert "eval_attention/entropy/layer0_head0" in scalars and "eval/val_loss" in scalars
        assert {"exposure_gap/greedy_loss_after_own", "exposure_gap/greedy_loss_after_true"} <= set(scalars)
        assert not any(tag.startswith(tuple(names)) for tag in scalars)  # no run-name prefixes
        assert "eval_samples/text_summary" in tags["tensors"]
    shared = [
        {t for t in tags["scalars"] if not t.startswith("eval_attention/")} for tags in per_model.values()
    ]
    assert shared[0] == shared[1]  # the same tags in every model's run, so the models overlay on one card
    top = tb_tags(evaluation / "tb")  # the report's own run: plots and text, no copies of the scalars
    assert top["scalars"] == [] and "report/exposure_gap" in top["images"]
    lines = [json.loads(line) for line in (evaluation / "metrics.jsonl").read_text().splitlines()]
    assert [r["model"] for r in lines] == names and all("eval/val_loss" in r for r in lines)


def test_printed_and_reported_teacher_forced_figures_say_on_how_many_tokens(evaluation):
    data = json.loads((evaluation / "metrics.json").read_text())
    stdout = (evaluation.parent / "stdout.txt").read_text()
    report = (evaluation / "report.md").read_text()
    assert data["context"]["eval_tokens"] == 4096  # the quick preset's --eval-tokens
    for name, m in data["models"].items():
        count = f"{int(m['val_tokens']):,} tokens"
        line = next(line for line in stdout.splitlines() if line.startswith(f"{name}: val loss"))
        assert count in line and "teacher-forced" in line
        gap = m["exposure_gap"]  # the gap printed beside the two losses it is the difference of
        assert f"{gap['gap'][-1]:+.3f}" in line
        assert f"loss {gap['own_prefix_loss'][-1]:.3f} after its own tokens" in line
        assert f"{gap['true_prefix_loss'][-1]:.3f} after the true ones" in line
        assert f"{gap['true_prefix_loss'][-1]:.3f} |" in report.split("## Exposure bias", 1)[1]
    assert f"on {int(data['models']['teacher']['val_tokens']):,} val tokens" in report
    assert "small gap + high loss after the true tokens" in stdout
    section = report.split("## Exposure bias", 1)[1].split("##", 1)[0]
    assert "How to read the gap" in section and "makes little use of its context" in section
    assert (
        "loss after the true tokens (j = 12)" in section and "loss after its own tokens (j = 12)" in section
    )


def results_of(evaluation: Path) -> dict[str, ModelResult]:
    data = json.loads((evaluation / "metrics.json").read_text())["models"]
    return {name: ModelResult.from_json(m) for name, m in data.items()}


def test_exposure_gap_plot_tells_models_and_rollout_modes_apart(evaluation):
    from pipeline.eval import plots

    results = results_of(evaluation)
    fig = plots.plot_exposure_gap(results)
    (model_key, mode_key) = fig.legends
    assert [t.get_text() for t in model_key.get_texts()] == ["teacher", "onehead"]
    modes = [t.get_text() for t in mode_key.get_texts()]
    assert modes[:2] == ["greedy (solid, circles)", "sampled (dashed, squares)"]
    greedy, sampled = mode_key.legend_handles[:2]
    assert (greedy.get_linestyle(), greedy.get_marker()) != (sampled.get_linestyle(), sampled.get_marker())
    assert greedy.get_linestyle() != sampled.get_linestyle() and greedy.get_marker() != sampled.get_marker()
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if "rollout" in line.get_label()}
    assert lines["teacher, greedy rollout"].get_color() == lines["teacher, sampled rollout"].get_color()
    assert lines["teacher, greedy rollout"].get_color() != lines["onehead, greedy rollout"].get_color()
    one = plots.plot_exposure_gap({"teacher": results["teacher"]})  # one model: one key, colour per mode
    labels = [t.get_text() for t in one.axes[0].get_legend().get_texts()]
    assert labels[:2] == ["teacher, greedy rollout", "teacher, sampled rollout"]


def test_attention_entropy_marks_collapsed_heads_as_its_title_says(evaluation):
    import dataclasses

    from matplotlib.patches import Rectangle

    from pipeline.eval import plots

    results = results_of(evaluation)
    plain = plots.plot_attention_entropy(results)
    assert "no head collapsed" in plain._suptitle.get_text() and "red" not in plain._suptitle.get_text()
    assert not [p for ax in plain.axes for p in ax.patches if isinstance(p, Rectangle)]
    att = dataclasses.replace(results["teacher"].attention, collapsed=[[1, 0]])
    marked = plots.plot_attention_entropy(
        results | {"teacher": dataclasses.replace(results["teacher"], attention=att)}
    )
    assert "red box: collapsed" in marked._suptitle.get_text()
    boxes = [p for p in marked.axes[0].patches if isinstance(p, Rectangle)]
    assert (
        len(boxes) == 1
        and boxes[0].get_xy() == (-0.5, 0.5)
        and boxes[0].get_edgecolor()[:3] == (1.0, 0.0, 0.0)
    )
    assert any(t.get_text().endswith("collapsed") for t in marked.axes[0].texts)


def test_sample_rows_carry_the_whole_model_name_and_the_rollout_mode(evaluation):
    from pipeline.eval import plots

    results = results_of(evaluation)
    long = "shakespeare-teacher-best"  # the longest kind of derived name (24 characters)
    results = {long: results["teacher"], "onehead": results["onehead"]}
    texts = [t.get_text() for t in plots.plot_samples(results, n=1).texts]
    for name in results:
        for mode in ("greedy", "sampled", "nucleus", "beam"):
            assert f"{name}, {mode}" in texts, (name, mode)
    assert "true continuation" in texts
