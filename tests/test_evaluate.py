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
    out = tmp_path_factory.mktemp("evaluate") / "run"
    teacher, student = exports
    args = ["--models", str(teacher), str(student / "best"), "--data", str(char_data), "--out", str(out)]
    run_recipe("evaluate", *args, "--preset", "quick", "--no-progress")
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
