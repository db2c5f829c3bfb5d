"""Comparisons: NAME=FLAGS parsing and folder checks, and recipes/compare.py end to end with the tiny preset."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import read_jsonl, run_recipe

from pipeline.errors import UsageError
from pipeline.studies import compare

# --------------------------------------------------------------------------------------------------
# Unit: --variants syntax, owned flags, what counts as the same configuration
# --------------------------------------------------------------------------------------------------


def test_variants_parse_names_and_shell_split_flags():
    base, heads = compare.parse_variants(["base=", "h8=--model.n-heads 8 --optim.lr=3e-4"])
    assert (base.name, base.flags, base.args) == ("base", "", [])
    assert heads.args == ["--model.n-heads", "8", "--optim.lr=3e-4"]


@pytest.mark.parametrize(
    ("specs", "says"),
    [
        ([], "at least one"),
        (["h8"], "has no '='"),
        (["a=", "a=--model.n-heads 4"], "twice"),
        (["../x="], "unsafe as a folder name"),
        (["tb="], "reserved"),
        (["a=--model.n-heads '4"], "quotes"),
        (["a=--train.seed 3"], "--seed"),
        (["a=--max-steps 3"], "--max-steps"),
        (["a=--data.dir x"], "--data"),
        (["a=--data.encoding gpt2"], "every variant reads one data folder"),  # was ignored for the preset's
        (["a=--data.corpus x.txt"], "every variant reads one data folder"),
    ],
)
def test_bad_variants_are_refused_with_the_fix(specs, says):
    with pytest.raises(UsageError, match="--variants") as err:
        compare.parse_variants(specs)
    assert says in str(err.value)


def test_config_changes_ignore_resolved_and_cosmetic_settings(tmp_path):
    now = {"model": {"n_heads": 4, "vocab_size": 0}, "data": {"dir": str(tmp_path), "encoding": "gpt2"}}
    now |= {"train": {"progress": False, "seed": 1}, "out": str(tmp_path / "a")}
    saved = {"model": {"n_heads": 4, "vocab_size": 46}, "data": {"dir": str(tmp_path), "encoding": "char"}}
    saved |= {
        "train": {"progress": True, "seed": 1},
        "out": str(tmp_path / "." / "a"),
        "vocab": {"classes": 46},
    }
    assert compare.config_changes(now, saved) == {}
    now["model"]["n_heads"] = 8
    assert compare.config_changes(now, saved) == {"model.n_heads": (4, 8)}


def test_flag_keys_name_the_config_fields_flags_set():
    variants = compare.parse_variants(["a=--model.n-heads 8", "b=--model.no-bias --optim.lr=1e-3"])
    config = {"model": {"n_heads": 8, "bias": False}, "optim": {"lr": 1e-3}}
    keys = compare.flag_keys(variants, [config, config])
    assert keys == ["model.n_heads", "model.bias", "optim.lr"]
    assert compare.hparams(variants[0], config, keys) == {
        "variant": "a",
        "model.n_heads": 8,
        "model.bias": False,
        "optim.lr": 1e-3,
    }


def test_diagnostics_are_the_last_evaluations_prefixed_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:  # what the probes log to TensorBoard only
        writer.add_scalar("heads/importance/layer0_head0", 0.25, 3)
        writer.add_scalar("heads/importance/layer0_head0", 0.5, 6)
        writer.add_scalar("grad_rms/ffn", 9.0, 6)
        writer.add_scalar("val/loss", 0.9, 6)
    records = [
        {"step": 3, "val_loss": 1.0, "clipped_share": 1.0},
        {"step": 6, "val_loss": 0.9, "clipped_share": 0.5, "grad_rms/ffn": 0.1, "lr": 1e-3, "val_bpb": 1.3},
        {"step": 7, "loss": 0.8, "clipped_share": 0.0},  # a log record after the last evaluation
    ]
    assert compare.diagnostics(records) == {"clipped_share": 0.5, "grad_rms/ffn": 0.1}
    assert compare.diagnostics(records, tmp_path) == {
        "clipped_share": 0.5,
        "grad_rms/ffn": 0.1,  # metrics.jsonl's record wins
        "heads/importance/layer0_head0": 0.5,  # the evaluation's step, not an earlier one
    }
    assert compare.diagnostics([{"step": 2, "loss": 1.0}], tmp_path) == {}


# --------------------------------------------------------------------------------------------------
# Integration: two variants, a rerun that trains nothing, refusals before any run
# --------------------------------------------------------------------------------------------------

VARIANTS = ("base=", "l1=--model.n-layers 1")
CONTRACT_COLUMNS = (
    "variant", "flags", "parameters", "best_val_loss", "final_val_loss", "final_val_bpb", "tokens_per_s",
    "peak_mem_gib", "steps", "tokens", "wall_time_s", "initial_val_loss",
)  # fmt: skip


def compare_args(data, out, *variants):
    args = ["--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "6"]
    return [*args, "--evals", "1", "--parallel", "2", "--no-progress", "--variants", *variants]


@pytest.fixture(scope="module")
def comparison(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "layers"
    args = compare_args(char_data, out, *VARIANTS)
    first = run_recipe("compare", *args, timeout=240)
    return out, args, first


def read_rows(out):
    with (out / "summary.csv").open() as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_two_variants_write_two_rows_plots_and_hparams(comparison):
    out, _, first = comparison
    columns, rows = read_rows(out)
    assert set(CONTRACT_COLUMNS) <= set(columns)
    assert [r["variant"] for r in rows] == ["base", "l1"]
    assert rows[1]["flags"] == "--model.n-layers 1"
    for row in rows:
        run = out / row["variant"]
        result = json.loads((run / "result.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert int(row["parameters"]) == result["parameters"]["total"]
        assert float(row["best_val_loss"]) == pytest.approx(result["best_val_loss"])
        assert int(row["steps"]) == 6 and config["train"]["seed"] == 1337
        assert list((run / "tb").glob("events.out.tfevents.*"))  # the run's own curves stay in place
    assert int(rows[0]["parameters"]) > int(rows[1]["parameters"])  # two blocks against one
    last_eval = [r for r in compare.by_step(out / "l1") if "val_loss" in r][-1]
    logged = {k for k in last_eval if k.startswith(compare.DIAGNOSTIC_PREFIXES)}
    assert logged <= set(columns) and rows[1]["steps"] == str(last_eval["step"])
    for name in ("val_loss", "train_loss", "best_val_loss"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| base | (preset) |" in (out / "summary.md").read_text()
    assert hparams(out / "tb" / "base")["model.n_layers"] == 2
    assert hparams(out / "tb" / "l1")["model.n_layers"] == 1
    assert "0 of 2" not in first.stdout and "2 of 2 variants to train" in first.stdout


def hparams(log_dir):
    """The hparams a TensorBoard run folder records."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    for raw in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            info = data.session_start_info.hparams
            return {k: v.string_value or v.number_value or v.bool_value for k, v in info.items()}
    raise AssertionError(f"no hparams in {log_dir}")


def test_rerun_reuses_finished_variants(comparison):
    out, args, _ = comparison
    before = {v: (out / v / "metrics.jsonl").read_text() for v in ("base", "l1")}
    stamps = {v: (out / v / "result.json").stat().st_mtime_ns for v in ("base", "l1")}
    again = run_recipe("compare", *args, timeout=120)
    assert "0 of 2 variants to train" in again.stdout
    for v in ("base", "l1"):
        assert f"{v}: finished earlier" in again.stdout
        assert (out / v / "metrics.jsonl").read_text() == before[v]
        assert (out / v / "result.json").stat().st_mtime_ns == stamps[v]
    assert [r["variant"] for r in read_rows(out)[1]] == ["base", "l1"]


def test_changed_flags_for_an_existing_variant_are_refused(comparison, char_data):
    out, _, _ = comparison
    records = len(read_jsonl(out / "l1" / "metrics.jsonl"))
    proc = run_recipe(
        "compare", *compare_args(char_data, out, "l1=--model.n-layers 3"), check=False, timeout=60
    )
    assert proc.returncode == 2
    assert "--variants l1" in proc.stderr and "model.n_layers" in proc.stderr
    assert "another --out" in proc.stderr and "never overwritten" in proc.stderr
    assert len(read_jsonl(out / "l1" / "metrics.jsonl")) == records
    assert json.loads((out / "l1" / "config.json").read_text())["model"]["n_layers"] == 1


def test_a_bad_flag_in_any_variant_fails_before_any_run(char_data, tmp_path):
    out = tmp_path / "cmp"
    variants = ("ok=", "typo=--model.n-hedas 4")
    proc = run_recipe("compare", *compare_args(char_data, out, *variants), check=False, timeout=60)
    assert proc.returncode == 2
    assert "--variants typo" in proc.stderr and "--model.n-hedas" in proc.stderr
    assert not out.exists()


def test_dry_run_prints_each_command_and_writes_nothing(char_data, tmp_path):
    out = tmp_path / "cmp"
    proc = run_recipe("compare", *compare_args(char_data, out, *VARIANTS), "--dry-run", timeout=60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("base:", "l1:"))]
    assert len(lines) == 2 and all("recipes/pretrain.py" in line for line in lines)
    assert f"--out {out / 'l1'}" in lines[1] and "--model.n-layers 1" in lines[1]
    assert not out.exists()


def test_run_args_reach_every_variant_before_its_own_flags(char_data, tmp_path):
    out = tmp_path / "cmp"
    args = (*compare_args(char_data, out, *VARIANTS), "--run-args=--model.dropout 0.1 --model.n-layers 3")
    proc = run_recipe("compare", *args, "--dry-run", timeout=60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("base:", "l1:"))]
    assert all("--model.dropout 0.1" in line for line in lines)
    # the variant's own flag comes after the shared one, so it wins
    assert lines[1].index("--model.n-layers 3") < lines[1].index("--model.n-layers 1")
    owned = run_recipe(
        "compare", *compare_args(char_data, out, *VARIANTS), "--run-args=--train.seed 3", check=False
    )
    assert owned.returncode == 2 and "--run-args" in owned.stderr and "--train.seed" in owned.stderr
