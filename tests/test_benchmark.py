"""The benchmark recipe: its table rows and the repetition budget (speed itself is never asserted)."""

from __future__ import annotations

import json

import torch
from conftest import need_tiktoken, run_recipe

from pipeline.studies import benchmark as benchmarking
from pipeline.studies.benchmark import Case


def test_benchmark_writes_a_row_per_implementation_and_vocabulary(tiny_corpus, tmp_path):
    need_tiktoken("gpt2")  # a BPE vocabulary the small corpus uses a sliver of, so both vocabularies run
    data = tmp_path / "data"
    run_recipe("tokenize", "--input", str(tiny_corpus), "--encoding", "gpt2", "--out", str(data))
    out = tmp_path / "bench"
    proc = run_recipe(
        "benchmark", "--preset", "tiny", "--data", str(data), "--out", str(out),
        "--batch", "4", "--repeats", "2", "--gen-tokens", "8",
    )  # fmt: skip
    result = json.loads((out / "benchmark.json").read_text())
    rows = {(r["impl"], r["vocab"]): r for r in result["rows"]}
    assert set(rows) == {
        ("naive", "full"),
        ("pipeline", "full"),
        ("naive", "compact"),
        ("pipeline", "compact"),
    }
    for row in rows.values():
        assert {"impl", "vocab", "batch", "tokens_per_s", "peak_mem_gib", "mfu", "fits"} <= set(row)
        assert row["fits"] and row["batch"] == 4
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert 0 < row["mfu"] and row["peak_mem_gib"] > 0
    modes = {(g["impl"], g["vocab"], g["use_cache"]) for g in result["generation"]}
    assert modes == {
        (i, v, c)
        for v in ("full", "compact")
        for i, c in (("naive", False), ("pipeline", False), ("pipeline", True))
    }
    assert all(g["gen_tokens_per_s"] > 0 for g in result["generation"])
    assert result["peaks_flop_per_s"]["fp32"] > 0 and result["peaks_flop_per_s"]["bf16"] > 0
    assert "naive" in proc.stdout and "KV cache" in proc.stdout


def _case(**kw) -> Case:
    base = dict(
        kind="train", impl="pipeline", vocab="full", model={}, batch=1, seq_len=8, precision="no",
        device="cpu", warmup=0, repeats=4, mem_limit_gib=8.0, threads=1,
    )  # fmt: skip
    return Case(**(base | kw))


def test_repetitions_stop_once_the_budget_is_spent():
    calls = []
    device = torch.device("cpu")
    assert len(benchmarking._timed(_case(budget_s=0.0), device, calls.append)) == 4
    assert calls == [0, 1, 2, 3]
    calls.clear()
    # Any repetition takes longer than a nanosecond: the budget is spent after the first one.
    assert len(benchmarking._timed(_case(budget_s=1e-9), device, calls.append)) == 1
    assert calls == [0]
