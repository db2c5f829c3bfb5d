"""The benchmark's case list (recipes/benchmark.py): which precision each case runs in, and so which
matmul peaks the run measures. Nothing here runs a case or times anything: `matmul_peak` and the
case runner are replaced by recorders.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pipeline import accel, cli
from pipeline.data.shards import TokenData
from pipeline.studies.benchmark import PEAK_DTYPES

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def recipe():
    """recipes/benchmark.py as a module (recipes/ is not a package; its `__main__` block stays off)."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_recipe_under_test", ROOT / "recipes" / "benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


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


def test_the_recipe_passes_the_auto_precision_of_a_slow_bf16_cpu_to_its_cases(
    recipe, peaks_asked, char_data, monkeypatch, tmp_path, restore_threads
):
    """--precision auto on a CPU whose bf16 is slow: resolve_precision says 'no', and the cases get 'no'."""
    from types import SimpleNamespace

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(accel, "cpu_bf16_decision", lambda: (False, "cpu flags: no amx_bf16/avx512_bf16"))
    monkeypatch.setattr(accel, "Accelerator", _FakeAccelerator)
    data = TokenData.open(char_data)
    monkeypatch.setattr(
        recipe,
        "stage",
        SimpleNamespace(prepare_data=lambda accelerator, cfg: data, write_run_files=lambda *args: None),
    )
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
