"""The benchmark recipe: its table rows and the repetition budget (speed itself is never asserted)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import torch
from conftest import need_tiktoken, run_recipe

from pipeline.studies import benchmark as benchmarking
from pipeline.studies.benchmark import Case
from pipeline.train.losses import loss_chunk_rows


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
    # Each row's speed against the textbook code's on its own vocabulary, in this run.
    for (_impl, vocab), row in rows.items():
        assert row["vs_textbook"] == row["tokens_per_s"] / rows[("naive", vocab)]["tokens_per_s"]
    textbook_gen = {g["vocab"]: g["gen_tokens_per_s"] for g in result["generation"] if g["impl"] == "naive"}
    assert all(
        g["vs_textbook"] == g["gen_tokens_per_s"] / textbook_gen[g["vocab"]] for g in result["generation"]
    )
    assert "vs textbook" in proc.stdout and "the textbook loop)" in proc.stdout
    # Exactly the peaks of the precisions the rows ran in are measured (naive: fp32; the pipeline:
    # the resolved --precision, fp32 or bf16 by CPU), and each row's MFU columns refer only to them.
    peaks = result["peaks_flop_per_s"]
    assert set(peaks) == {benchmarking.peak_key(r["precision"]) for r in result["rows"]}
    assert all(peak > 0 for peak in peaks.values())
    runs = result["peak_measurements_flop_per_s"]  # before and after the cases; the higher counts
    assert set(runs) == set(peaks) and all(len(r) == 2 and peaks[k] == max(r) for k, r in runs.items())
    for row in rows.values():
        assert row["mfu"] == row["flop_per_s"] / peaks[benchmarking.peak_key(row["precision"])]
        assert {k for k in row if k.startswith("mfu_")} == {f"mfu_{key}_peak" for key in peaks}
    assert "naive" in proc.stdout and "KV cache" in proc.stdout
    # The memory account beside the measured peak: the textbook code holds the full logits three
    # times over (logits, log-softmax, their gradient), the fused loss one chunk of rows.
    for row in rows.values():
        account = row["memory_account"]
        assert row["analytic_gib"] == account["total_bytes"] / 2**30 > 0 and 0 < row["base_mem_gib"]
        assert row["base_mem_gib"] <= row["peak_mem_gib"]
        counted = {r["name"] for r in account["rows"] if r["counted"]}
        assert ("logits_full" in counted) == (row["impl"] == "naive") != ("logits_chunk" in counted)
    assert rows[("naive", "full")]["analytic_gib"] > rows[("pipeline", "full")]["analytic_gib"]
    assert proc.stdout.count("memory account (analytic, per process)") == len(rows)
    assert "analytic" in proc.stdout.split("generation, batch 1")[0].split("device:")[-1]


def _case(**kw) -> Case:
    base = dict(
        kind="train", impl="pipeline", vocab="full", model={}, batch=1, seq_len=8, precision="no",
        device="cpu", warmup=0, repeats=4, mem_limit_gib=8.0, threads=1,
    )  # fmt: skip
    return Case(**(base | kw))


def test_case_account_follows_the_path_each_implementation_runs():
    model = dict(block="transformer", n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=500)
    naive = benchmarking.case_account(_case(impl="naive", model=model))
    fused = benchmarking.case_account(_case(model=model, checkpointing=True))
    assert naive.shape["chunk_rows"] == 0 and naive.shape["attention"].startswith("materialised")
    assert naive.row("attention_probs").counted and naive.row("logits_full").counted
    assert fused.shape["chunk_rows"] == loss_chunk_rows(500) and fused.shape["checkpointing"]
    assert not fused.row("logits_full").counted and fused.row("logits_chunk").counted
    assert fused.total < naive.total


def test_repetitions_stop_once_the_budget_is_spent():
    calls = []
    device = torch.device("cpu")
    assert len(benchmarking._timed(_case(budget_s=0.0), device, calls.append)) == 4
    assert calls == [0, 1, 2, 3]
    calls.clear()
    # Any repetition takes longer than a nanosecond: the budget is spent after the first one.
    assert len(benchmarking._timed(_case(budget_s=1e-9), device, calls.append)) == 1
    assert calls == [0]


def test_short_repetitions_fill_the_minimum_time_and_long_ones_stop_at_repeats():
    device = torch.device("cpu")
    fast = benchmarking._timed(_case(min_timed_s=0.05), device, lambda i: None)
    assert 4 < len(fast) <= benchmarking.MAX_REPEATS  # far more than --repeats to fill 50 ms
    slow = benchmarking._timed(_case(min_timed_s=0.05), device, lambda i: time.sleep(0.02))
    assert len(slow) == 4  # 80 ms already fill it: --repeats
    calls = []
    benchmarking._timed(_case(), device, calls.append, first=3)
    assert calls == [3, 4, 5, 6]  # the step index continues after the warm-up


def test_a_warm_up_step_longer_than_the_budget_is_the_measurement():
    model = dict(block="transformer", n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=50)
    batches = [(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8))) for _ in range(6)]
    cpu = torch.device("cpu")
    cfg = benchmarking.ModelConfig(**model)
    long = benchmarking._time_training(_case(model=model, warmup=1, budget_s=1e-9), cfg, batches, cpu)
    assert long["timed_warmup"] and long["warmup_steps"] == 1 and long["timed_steps"] == 1
    assert long["first_step_s"] == long["step_s"]  # the one step is both the first and the measurement
    usual = benchmarking._time_training(_case(model=model, warmup=1, budget_s=60.0), cfg, batches, cpu)
    assert not usual["timed_warmup"] and usual["warmup_steps"] == 1 and usual["timed_steps"] == 4
    assert usual["first_step_s"] > 0  # the warm-up's own time (with --compile, the compilation's)


def test_the_step_that_compiled_the_model_is_never_the_measurement(monkeypatch):
    """torch.compile's first step times the compiler: however long, a compiled case times more steps,
    and warms up once even with --warmup 0. (torch.compile itself is replaced by the eager model.)"""
    compiled: list[torch.nn.Module] = []

    def compile_(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", compile_)
    model = dict(block="transformer", n_layers=1, n_heads=2, d_model=16, max_seq_len=8, vocab_size=50)
    batches = [(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8))) for _ in range(6)]
    cpu = torch.device("cpu")
    cfg = benchmarking.ModelConfig(**model)
    for warmup in (1, 0):
        case = _case(model=model, warmup=warmup, repeats=2, budget_s=1e-9, compile=True)
        row = benchmarking._time_training(case, cfg, batches, cpu)
        assert not row["timed_warmup"] and row["warmup_steps"] == 1 and row["timed_steps"] == 1
    assert len(compiled) == 2  # the cases did compile
    eager = benchmarking._time_training(_case(model=model, warmup=0, repeats=2), cfg, batches, cpu)
    assert eager["warmup_steps"] == 0  # --warmup 0 still means none where nothing compiles


def test_matmul_peak_is_bounded_in_size_and_time():
    cpu = torch.device("cpu")
    # No time left after the first size: one warm-up and one timed matmul at the starting size.
    first = benchmarking.measure_matmul_peak(torch.float32, cpu, min_size=16, time_cap_s=0.0)
    assert first.flop_per_s > 0 and first.size == 16 and first.matmuls == 2
    # Time to spare and a generous per-matmul target: the size doubles up to max_size, never past it.
    capped = benchmarking.measure_matmul_peak(
        torch.float32, cpu, max_size=48, min_size=8, target_s=60.0, time_cap_s=600.0, repeats=2
    )
    assert capped.flop_per_s > 0 and capped.size == 32 and capped.matmuls == 3 * 3
    assert benchmarking.matmul_peak(torch.bfloat16, cpu, max_size=8, time_cap_s=0.0) > 0


def test_a_case_that_did_not_fit_in_one_round_does_not_fit():
    fitted = {"fits": True, "tokens_per_s": 10.0, "tokens_per_s_min": 9.0, "tokens_per_s_max": 11.0,
              "peak_mem_gib": 1.0, "base_mem_gib": 0.2}  # fmt: skip
    failed = {"fits": False, "note": "out of memory (can't allocate)"}
    row = benchmarking.merge_rounds([fitted, failed, fitted])
    assert row["fits"] is False and row["note"] == failed["note"] and row["rounds"] == 3
    assert benchmarking.round_order(3, 0) == [0, 1, 2] and benchmarking.round_order(3, 1) == [2, 1, 0]


def test_a_profiled_case_names_the_ops_that_took_its_step():
    model = dict(block="transformer", n_layers=1, n_heads=2, d_model=32, max_seq_len=8, vocab_size=300)
    case = _case(model=model, batch=4, warmup=1, repeats=1, profile=True)
    batches = [(torch.randint(0, 300, (4, 8)), torch.randint(0, 300, (4, 8))) for _ in range(2)]
    row = benchmarking._time_training(case, benchmarking.ModelConfig(**model), batches, torch.device("cpu"))
    ops = row["profile"]
    assert 0 < len(ops) <= benchmarking.PROFILE_OPS
    assert [op["self_s"] for op in ops] == sorted((op["self_s"] for op in ops), reverse=True)
    assert all(op["self_s"] >= 0 for op in ops) and 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
    assert any("mm" in op["op"] for op in ops)  # a training step is matmuls first of all
    unprofiled = benchmarking._time_training(
        _case(model=model, batch=4, warmup=1, repeats=1), benchmarking.ModelConfig(**model), batches,
        torch.device("cpu"),
    )  # fmt: skip
    assert "profile" not in unprofiled


def test_a_foreach_case_trains_with_the_foreach_adamw(monkeypatch):
    """The case's optimizer reaches the step: the AdamW each case builds, recorded."""
    built: list[dict] = []
    real = torch.optim.AdamW

    def recording_adamw(params, **kw):
        built.append(kw)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    model = dict(block="transformer", n_layers=1, n_heads=2, d_model=32, max_seq_len=8, vocab_size=300)
    batches = [(torch.randint(0, 300, (4, 8)), torch.randint(0, 300, (4, 8))) for _ in range(2)]
    for optimizer in ("fused", "foreach"):
        case = _case(model=model, batch=4, warmup=1, repeats=1, optimizer=optimizer)
        benchmarking._time_training(case, benchmarking.ModelConfig(**model), batches, torch.device("cpu"))
    assert built[0].get("fused") is True  # torch 2.4+ has a fused AdamW on the CPU
    assert built[1].get("foreach") is True and not built[1].get("fused")


def _in_fresh_process_within(seconds: float, fn, *args) -> tuple[str, object]:
    """benchmarking.in_fresh_process(fn, *args), failing the test (not hanging it) past `seconds`."""
    answer: list = []
    waiter = threading.Thread(
        target=lambda: answer.append(benchmarking.in_fresh_process(fn, *args)), daemon=True
    )
    waiter.start()
    waiter.join(seconds)
    assert answer, f"no answer after {seconds} s: the parent is still waiting for a process that died"
    return answer[0]


def test_a_case_process_killed_by_the_kernel_is_reported_not_waited_for():
    """The OOM killer's SIGKILL (raised by the child at itself): the run goes on with a note. A
    multiprocessing.Pool, which ran the cases before, waited for the dead worker's answer forever."""
    outcome, note = _in_fresh_process_within(120, signal.raise_signal, signal.SIGKILL)
    assert outcome == "died" and "SIGKILL" in note and "out-of-memory killer" in note
    outcome, note = _in_fresh_process_within(120, os._exit, 3)  # libgomp, say, ending it with exit(1)
    assert outcome == "died" and "exited with code 3" in note
    if hasattr(signal, "SIGRTMIN"):  # Linux: real-time signals have no name of their own
        outcome, note = _in_fresh_process_within(120, signal.raise_signal, signal.SIGRTMIN + 1)
        assert outcome == "died" and note == f"its process died of signal {signal.SIGRTMIN + 1}"


def test_a_case_process_answers_its_value_or_the_exception_it_raised():
    assert _in_fresh_process_within(120, sum, [1, 2, 3]) == ("ok", 6)
    outcome, text = _in_fresh_process_within(120, int, "x")
    assert outcome == "raised" and text.startswith("ValueError: invalid literal")


def test_a_case_whose_process_died_does_not_fit_and_its_note_names_the_memory_cap(monkeypatch):
    case = _case(mem_limit_gib=0.5)
    monkeypatch.setattr(
        benchmarking, "in_fresh_process", lambda fn, *args: ("died", "its process was killed")
    )
    row = benchmarking.in_child(case, [])
    assert row["fits"] is False and row["impl"] == case.impl
    assert (
        row["note"] == "its process was killed; it ran under an address-space cap of 0.50 GiB (--max-mem-gib)"
    )
    monkeypatch.setattr(benchmarking, "in_fresh_process", lambda fn, *args: ("raised", "KeyError: 'x'"))
    assert benchmarking.in_child(case, [])["note"] == "KeyError: 'x'"  # a raise is no memory matter
