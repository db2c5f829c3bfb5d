"""The benchmark's case list (recipes/benchmark.py): which precision each case runs in, and so which
matmul peaks the run measures. Nothing here runs a case or times anything: `matmul_peak` and the
case runner are replaced by recorders.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipeline import accel, cli
from pipeline.data.shards import TokenData
from pipeline.studies.benchmark import PEAK_DTYPES

CPU = torch.device("cpu")


@pytest.fixture
def peaks_asked(recipe, monkeypatch) -> list[torch.dtype]:
    """The dtypes `matmul_peak` is asked for; each answers a constant instead of timing matmuls."""
    asked: list[torch.dtype] = []

    def matmul_peak(dtype: torch.dtype, device: torch.device, **kw) -> float:
        asked.append(dtype)
        return 1e9

    monkeypatch.setattr(recipe, "matmul_peak", matmul_peak)
    return asked


def config(recipe, *flags: str):
    """The benchmark's config for the tiny teacher, as `python recipes/benchmark.py --preset tiny FLAGS` parses it."""
    return cli.parse(
        recipe.BenchmarkConfig, recipe.PRESETS, ["--preset", "tiny", "--gen-tokens", "8", *flags]
    )


def cases(recipe, cfg, data: Path, precision: str) -> list:
    return [case for case, _ in recipe.make_cases(cfg, TokenData.open(data), CPU, precision, 1.0)]


def test_slow_bf16_runs_every_case_in_fp32_and_measures_only_the_fp32_peak(recipe, peaks_asked, char_data):
    listed = cases(recipe, config(recipe), char_data, "no")
    assert {(c.kind, c.impl) for c in listed} == {
        ("train", "naive"),
        ("train", "pipeline"),
        ("generate", "naive"),
        ("generate", "pipeline"),
    }
    assert {c.precision for c in listed} == {"no"}  # no case, training or generation, in bf16
    peaks = recipe.measure_peaks(listed, CPU)
    assert set(peaks) == {"fp32"} and peaks_asked == [torch.float32]


def test_bf16_runs_the_pipeline_in_bf16_and_the_textbook_code_in_fp32(recipe, peaks_asked, char_data):
    listed = cases(recipe, config(recipe), char_data, "bf16")
    assert {c.precision for c in listed if c.impl == "pipeline"} == {"bf16"}
    assert {c.precision for c in listed if c.impl == "naive"} == {"no"}
    assert any(c.impl == "naive" for c in listed) and any(c.impl == "pipeline" for c in listed)
    peaks = recipe.measure_peaks(listed, CPU)
    assert set(peaks) == {"bf16", "fp32"}
    assert sorted(peaks_asked, key=str) == sorted([PEAK_DTYPES["bf16"], PEAK_DTYPES["fp32"]], key=str)


def test_pipeline_only_in_bf16_measures_only_the_bf16_peak(recipe, peaks_asked, char_data):
    listed = cases(recipe, config(recipe, "--impls", "pipeline"), char_data, "bf16")
    assert listed and {c.impl for c in listed} == {"pipeline"}
    assert {c.precision for c in listed} == {"bf16"}
    assert set(recipe.measure_peaks(listed, CPU)) == {"bf16"} and peaks_asked == [torch.bfloat16]


class _Stop(Exception):
    """Raised instead of running the first case: the test has what it needs by then."""


class _FakeAccelerator:
    """Accelerate's Accelerator as far as build_accelerator and the recipe use it, keeping the precision asked for."""

    def __init__(self, mixed_precision: str, **_) -> None:
        self.mixed_precision = mixed_precision
        self.device = CPU
        self.num_processes = 1
        self.is_main_process = True


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_recipe(recipe, char_data, monkeypatch, restore_threads):
    """The recipe with a fake Accelerator (it keeps the precision asked for) and the char data as its
    prepared data, writing no run files; the tests replace its case runner."""
    from types import SimpleNamespace

    monkeypatch.setattr(accel, "Accelerator", _FakeAccelerator)
    data = TokenData.open(char_data)
    monkeypatch.setattr(
        recipe,
        "stage",
        SimpleNamespace(prepare_data=lambda accelerator, cfg: data, write_run_files=lambda *args: None),
    )
    return recipe


def test_the_recipe_passes_the_auto_precision_of_a_slow_bf16_cpu_to_its_cases(
    offline_recipe, peaks_asked, monkeypatch, tmp_path
):
    """--precision auto on a CPU whose bf16 is slow: resolve_precision says 'no', and the cases get 'no'."""
    recipe = offline_recipe
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(accel, "cpu_bf16_decision", lambda: (False, "cpu flags: no amx_bf16/avx512_bf16"))
    passed: list[str] = []
    make_cases = recipe.make_cases

    def recording_make_cases(cfg, data, device, precision, mem_limit):
        passed.append(precision)
        return make_cases(cfg, data, device, precision, mem_limit)

    def in_child(case, batches):
        raise _Stop

    monkeypatch.setattr(recipe, "make_cases", recording_make_cases)
    monkeypatch.setattr(recipe, "in_child", in_child)
    cfg = config(recipe, "--out", str(tmp_path / "bench"), "--max-mem-gib", "1")
    assert cfg.precision == "auto"
    with pytest.raises(_Stop):
        recipe.main(cfg)
    assert passed == ["no"]
    assert accel.last_precision_decision() == ("no", "auto: cpu flags: no amx_bf16/avx512_bf16")
    assert peaks_asked == [torch.float32]  # the peaks were measured before the first case, for fp32 only

    # The same CPU with fast bf16: the cases get bf16 (the decision, not a constant, reaches them).
    monkeypatch.setattr(accel, "cpu_bf16_decision", lambda: (True, "cpu flags: avx512_bf16"))
    with pytest.raises(_Stop):
        recipe.main(cfg)
    assert passed == ["no", "bf16"]
    assert sorted(peaks_asked[1:], key=str) == sorted([torch.bfloat16, torch.float32], key=str)


def test_rounds_alternate_the_case_order_and_report_the_median_of_each_rounds_ratio(
    offline_recipe, peaks_asked, monkeypatch, tmp_path
):
    """--rounds 3: the cases run forward, backward, forward (ABBA), and `vs textbook` is the median of
    the three rounds' ratios, not the ratio of the two medians (which would be 1.5x here, not 2x)."""
    from dataclasses import asdict

    recipe = offline_recipe
    monkeypatch.setattr(accel, "cpu_bf16_decision", lambda: (False, "cpu flags: none"))
    speeds = {"naive": [100.0, 50.0, 100.0], "pipeline": [150.0, 100.0, 300.0]}  # tokens/s per round
    order: list[str] = []

    def in_child(case, batches):
        label = case.impl if case.kind == "train" else f"gen-{case.impl}-{case.use_cache}"
        order.append(label)
        n_round = sum(seen == label for seen in order) - 1
        row = asdict(case) | {"fits": True, "peak_mem_gib": 1.0 + n_round, "base_mem_gib": 0.5}
        if case.kind == "generate":
            return row | {"gen_tokens_per_s": 10.0, "gen_tokens_per_s_min": 9.0, "gen_tokens_per_s_max": 11.0}
        speed = speeds[case.impl][n_round]
        return row | {
            "tokens_per_s": speed, "tokens_per_s_min": speed - 1, "tokens_per_s_max": speed + 1,
            "flop_per_s": speed * 1e6, "timed_warmup": False, "timed_steps": 3,
        }  # fmt: skip

    monkeypatch.setattr(recipe, "in_child", in_child)
    cfg = config(recipe, "--out", str(tmp_path / "bench"), "--max-mem-gib", "1", "--rounds", "3")
    result = recipe.main(cfg)

    forward = ["naive", "pipeline", "gen-naive-False", "gen-pipeline-False", "gen-pipeline-True"]
    assert order == forward + forward[::-1] + forward
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["pipeline"]["vs_textbook_rounds"] == [1.5, 2.0, 3.0]
    assert rows["pipeline"]["vs_textbook"] == 2.0
    assert rows["naive"]["vs_textbook"] == 1.0
    # Each row is its median round's measurement, its range that of every round, its memory the highest.
    assert rows["pipeline"]["tokens_per_s"] == 150.0 and rows["pipeline"]["flop_per_s"] == 150e6
    assert (rows["pipeline"]["tokens_per_s_min"], rows["pipeline"]["tokens_per_s_max"]) == (99.0, 301.0)
    assert rows["pipeline"]["tokens_per_s_rounds"] == [150.0, 100.0, 300.0]
    assert rows["pipeline"]["peak_mem_gib"] == 3.0 and rows["pipeline"]["timed_steps"] == 9
    assert all(g["rounds"] == 3 and g["vs_textbook"] == 1.0 for g in result["generation"])


def test_each_variant_is_one_pipeline_case_with_its_compile_and_optimizer(recipe, char_data):
    listed = cases(recipe, config(recipe, "--variants", "eager", "compiled-foreach"), char_data, "no")
    train = [(c.impl, c.variant, c.compile, c.optimizer) for c in listed if c.kind == "train"]
    assert train == [
        ("naive", "", False, "loop"),
        ("pipeline", "eager", False, "fused"),
        ("pipeline", "compiled-foreach", True, "foreach"),
    ]
    assert sum(c.kind == "generate" for c in listed) == 3  # generation is not a variant's
    # Without --variants, one pipeline case, compiled as --compile says, with fused AdamW.
    for flags, expected in (((), ("eager", False)), (("--compile",), ("compiled", True))):
        listed = cases(recipe, config(recipe, *flags), char_data, "no")
        assert [
            (c.variant, c.compile, c.optimizer) for c in listed if c.kind == "train" and c.impl == "pipeline"
        ] == [(*expected, "fused")]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(compile=True, variants=("eager",)), "both set: name the compiled rows in --variants"),
        (dict(variants=("eager", "eager")), "names a variant twice: eager eager"),
        (dict(impls=("naive",), variants=("compiled",)), "add pipeline to --impls"),
    ],
)
def test_variants_that_contradict_the_other_flags_are_refused(recipe, settings, message):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        recipe.BenchmarkConfig(**settings)


def test_variants_are_compared_with_the_first_round_by_round(
    offline_recipe, peaks_asked, monkeypatch, tmp_path, capsys
):
    """--variants eager eager-foreach --rounds 3: `vs first` is the median of each round's ratio to the
    first variant's speed on the same vocabulary; the first variant's is 1.0 and the textbook has none."""
    from dataclasses import asdict

    recipe = offline_recipe
    monkeypatch.setattr(accel, "cpu_bf16_decision", lambda: (False, "cpu flags: none"))
    speeds = {"": [100.0] * 3, "eager": [200.0, 100.0, 200.0], "eager-foreach": [100.0, 150.0, 300.0]}
    seen: dict[str, int] = {}

    def in_child(case, batches):
        n_round = seen.get(case.variant, 0)
        seen[case.variant] = n_round + 1
        speed = speeds[case.variant][n_round]
        return asdict(case) | {
            "fits": True, "peak_mem_gib": 1.0, "base_mem_gib": 0.5, "tokens_per_s": speed,
            "tokens_per_s_min": speed, "tokens_per_s_max": speed, "flop_per_s": speed * 1e6,
            "timed_warmup": False, "timed_steps": 3, "first_step_s": 2.0 + n_round,
        }  # fmt: skip

    monkeypatch.setattr(recipe, "in_child", in_child)
    cfg = config(
        recipe, "--out", str(tmp_path / "bench"), "--max-mem-gib", "1", "--rounds", "3",
        "--gen-tokens", "0", "--variants", "eager", "eager-foreach",
    )  # fmt: skip
    result = recipe.main(cfg)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["eager-foreach"]["vs_first_rounds"] == [0.5, 1.5, 1.5]
    assert rows["eager-foreach"]["vs_first"] == 1.5  # the ratio of the medians would be 1.0
    assert rows["eager"]["vs_first"] == 1.0 and "vs_first" not in rows[""]
    assert rows["eager-foreach"]["optimizer"] == "foreach" and rows["eager"]["optimizer"] == "fused"
    printed = capsys.readouterr().out
    assert "pipeline eager-foreach full" in printed  # the table names each variant's row
    assert "eager-foreach full: 1.50x (rounds: 0.50x 1.50x 1.50x); first step 3.0 s" in printed


def test_a_run_left_with_no_case_is_refused_before_it_writes_anything(offline_recipe, peaks_asked, tmp_path):
    """--vocabs compact on data whose train split uses every id: no case at all, so no empty table."""
    from pipeline.errors import UsageError

    recipe = offline_recipe
    data = recipe.stage.prepare_data(None, None)
    assert not recipe.VocabMap.from_meta(data.meta, "on").compact  # every id is used
    out = tmp_path / "bench"
    cfg = config(recipe, "--out", str(out), "--max-mem-gib", "1", "--vocabs", "compact")
    with pytest.raises(UsageError, match="nothing to measure: --vocabs compact left no case"):
        recipe.main(cfg)
    assert not out.exists() and peaks_asked == []


def test_a_case_that_died_prints_dashes_for_the_memory_it_never_measured(recipe, capsys):
    died = {"impl": "pipeline", "vocab": "full", "batch": 4, "precision": "bf16", "fits": False,
            "note": "its process was killed", "analytic_gib": 1.5}  # fmt: skip
    recipe.print_tables([died], [], {"bf16": 4e11}, "cpu")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pipeline"))
    assert "nan" not in line and re.search(r" - +- +1\.50 no: its process was killed$", line)


def test_settings_the_cases_do_not_take_are_refused_not_ignored(recipe):
    """Every case runs without dropout and on the vocabularies of --vocabs: a --model.dropout or a
    --data.compact-vocab was accepted and changed nothing."""
    from pipeline.config import DataConfig, ModelConfig
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="every case is timed without dropout"):
        recipe.BenchmarkConfig(model=ModelConfig(dropout=0.1))
    with pytest.raises(ConfigError, match="--vocabs full compact picks the vocabularies"):
        recipe.BenchmarkConfig(data=DataConfig(compact_vocab="on"))
    for flags in (["--model.dropout", "0.1"], ["--data.compact-vocab", "on"]):
        with pytest.raises(SystemExit):  # the command line: exit 2 before anything runs
            config(recipe, *flags)
    shakespeare = cli.parse(recipe.BenchmarkConfig, recipe.PRESETS, ["--preset", "shakespeare"])
    assert shakespeare.model.dropout == 0.0  # its teacher trains with 0.2; the benchmark times none
