"""Benchmark: the sheet's textbook code against the pipeline, full against compacted vocabulary.

    accelerate launch recipes/benchmark.py --preset seed          # the table for the seed model (2-core CPU: ~4 min)
    python recipes/benchmark.py --preset seed --data.encoding gpt2 # the same shape with the gpt2 vocabulary
    python recipes/benchmark.py --preset char --vocabs full --gen-tokens 0 --rounds 5  # ratios on a noisy machine
    python recipes/benchmark.py --preset seed --impls pipeline --batch 64 --out runs/bench
    python recipes/benchmark.py --preset seed --impls pipeline --vocabs full --gen-tokens 0 --profile
    python recipes/benchmark.py --preset char --vocabs full --variants eager compiled eager-foreach --rounds 5

For each (implementation, vocabulary): training tokens/s (median and min-max over --repeats steps
after --warmup), achieved FLOP/s and MFU against the matmul peak of the case's own precision, peak
memory beside the analytic total of the memory account (each training case prints its terms first;
see pipeline/model/memory.py), whether it fits at all (on the CPU a case may take --max-mem-gib), and
its speed over the textbook code's on the same vocabulary, in the same run (`vs textbook`). The run first measures
the matmul peak of each precision its cases use, and only those: fp32 for the textbook code, the
resolved --precision for the pipeline (auto: bf16 where the device runs it fast, else fp32), each
in a second or two (see `measure_matmul_peak`), and again after the cases: the higher counts. Then
generation tokens/s at batch 1 for --gen-tokens new tokens: the textbook loop (whole context and
every logit each step), the pipeline without its KV cache (whole context, last position's logits),
and with it. Each case runs in a fresh process; --rounds N runs the list N times in ABBA order and
reports each row's median round and `vs textbook` as the median of the rounds' ratios; --profile
adds the ops that took most of one more step of each training case; --variants sets the pipeline
eager and compiled, with fused or foreach AdamW, side by side (`vs_first`). Prints a table; writes
benchmark.json (and config.json, env.json) into --out.
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from pipeline import accel, cli
from pipeline.cli import to_dict
from pipeline.data.shards import TokenData, TrainWindows
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.files import write_json
from pipeline.model.memory import account_lines
from pipeline.run.folder import RunDir, default_run_dir
from pipeline.studies.benchmark import (
    PEAK_DTYPES,
    Case,
    available_gib,
    case_account,
    in_child,
    matmul_peak,
    merge_rounds,
    peak_key,
    round_order,
)
from pipeline.studies.config import BenchmarkConfig
from pipeline.train import stage
from teachers import PRESETS as TEACHERS


def _from_teacher(name: str):
    def preset() -> BenchmarkConfig:
        teacher = TEACHERS[name]()
        return BenchmarkConfig(  # the cases' own settings: no dropout, the vocabularies of --vocabs
            data=dataclasses.replace(teacher.data, compact_vocab="auto"),
            model=dataclasses.replace(teacher.model, dropout=0.0),
            batch=teacher.train.micro_batch_size,
        )

    return preset


PRESETS = {name: _from_teacher(name) for name in TEACHERS}


def make_cases(cfg: BenchmarkConfig, data: TokenData, device: torch.device, precision: str, mem_limit: float):
    compact = VocabMap.from_meta(data.meta, "on")
    vocabs = {"full": VocabMap.identity(data.vocab_size), "compact": compact}
    threads = cfg.threads or torch.get_num_threads()
    for name in cfg.vocabs:
        vocab = vocabs[name]
        if name == "compact" and not vocab.compact:
            print(
                f"  compact: skipped, the train split uses all {data.vocab_size:,} ids of {data.meta['encoding']}"
            )
            continue
        model = dataclasses.asdict(dataclasses.replace(cfg.model, vocab_size=vocab.n_classes))
        n = cfg.warmup + cfg.repeats
        windows = TrainWindows(
            data.train, cfg.data.seq_len, cfg.batch, 1, seed=0, vocab=vocab, sampling=cfg.data.sampling
        )
        batches = [windows.batch(i, 0) for i in range(n)]
        common = dict(
            vocab=name,
            model=model,
            seq_len=cfg.data.seq_len,
            device=str(device),
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            mem_limit_gib=mem_limit,
            threads=threads,
            budget_s=cfg.case_seconds,
            min_timed_s=cfg.min_case_seconds,
        )
        for impl in cfg.impls:
            for variant in variants(cfg) if impl == "pipeline" else [""]:
                yield (
                    Case(
                        "train",
                        impl,
                        batch=cfg.batch,
                        precision="no" if impl == "naive" else precision,
                        compile=variant.startswith("compiled"),
                        optimizer=optimizer(impl, variant),
                        variant=variant,
                        profile=cfg.profile,
                        **common,
                    ),
                    batches,
                )
        if cfg.gen_tokens:
            gen = dict(
                common, batch=1, gen_tokens=cfg.gen_tokens, warmup=1, repeats=max(1, min(cfg.repeats, 3))
            )
            gen_batches = batches[:1]
            if "naive" in cfg.impls:
                yield Case("generate", "naive", precision="no", use_cache=False, **gen), gen_batches
            if "pipeline" in cfg.impls:
                yield Case("generate", "pipeline", precision=precision, use_cache=False, **gen), gen_batches
                yield Case("generate", "pipeline", precision=precision, use_cache=True, **gen), gen_batches


def variants(cfg: BenchmarkConfig) -> list[str]:
    """The pipeline's training rows: --variants, or the one --compile says."""
    return list(cfg.variants) or ["compiled" if cfg.compile else "eager"]


def optimizer(impl: str, variant: str) -> str:
    """The AdamW kernel of a training case: the textbook's per-tensor loop, else the variant's."""
    if impl == "naive":
        return "loop"
    return "foreach" if variant.endswith("-foreach") else "fused"


def measure_peaks(cases: list[Case], device: torch.device) -> dict[str, float]:
    """The matmul peak (FLOP/s) of each precision the training cases run in, and of no other.

    The run measures them before its cases and again after them, and keeps the higher of the two.
    """
    keys = sorted({peak_key(case.precision) for case in cases if case.kind == "train"})
    return {key: matmul_peak(PEAK_DTYPES[key], device) for key in keys}


def add_mfu(row: dict, peaks: dict[str, float]) -> dict:
    """`mfu` against the peak of the row's own precision; `mfu_<key>_peak` against each measured peak."""
    if "flop_per_s" in row:
        own = peaks.get(peak_key(row["precision"]))
        row["mfu"] = row["flop_per_s"] / own if own else None
        for key, peak in peaks.items():
            row[f"mfu_{key}_peak"] = row["flop_per_s"] / peak
    return row


def add_ratios(rows: list[dict], key: str, name: str, bases: dict[str, dict]) -> None:
    """`name`: each row's `key` speed over its vocabulary's row in `bases` (None when either did not
    run). Over several rounds it is the median of each round's ratio (`<name>_rounds`): the two
    cases of a round ran one after the other, so a shared machine's slow minutes cancel in each."""
    for r in rows:
        base = bases.get(r["vocab"])
        if not (r.get("fits") and base and base.get("fits") and base.get(key)):
            r[name] = None
            continue
        pairs = zip(r[f"{key}_rounds"], base[f"{key}_rounds"], strict=True)  # every case ran every round
        r[f"{name}_rounds"] = [mine / theirs for mine, theirs in pairs]
        r[name] = statistics.median(r[f"{name}_rounds"])


def add_textbook_ratios(rows: list[dict], key: str) -> None:
    """`vs_textbook`: each row's `key` speed over the textbook code's on the same vocabulary."""
    add_ratios(rows, key, "vs_textbook", {r["vocab"]: r for r in rows if r["impl"] == "naive"})


def add_variant_ratios(rows: list[dict], key: str) -> None:
    """`vs_first`: each pipeline row's `key` speed over the first variant's on the same vocabulary,
    when the run compares several variants (the textbook's rows get none)."""
    pipeline = [r for r in rows if r["impl"] == "pipeline"]
    if len({r["variant"] for r in pipeline}) > 1:
        first: dict[str, dict] = {}
        for r in pipeline:
            first.setdefault(r["vocab"], r)
        add_ratios(pipeline, key, "vs_first", first)


def _label(r: dict) -> str:
    """The row's implementation, and the pipeline's variant when the run compares several."""
    return f"{r['impl']} {r['variant']}" if "vs_first" in r else r["impl"]


def _ratio(r: dict) -> str:
    return f"{r['vs_textbook']:.2f}x" if r.get("vs_textbook") is not None else "-"


def print_tables(rows: list[dict], generation: list[dict], peaks: dict[str, float], device: str) -> None:
    measured = ", ".join(f"{key} {peak / 1e9:,.0f} GFLOP/s" for key, peak in peaks.items()) or "none"
    print(f"\ndevice: {device}; matmul peaks (the higher of the start and the end): {measured}")
    width = max([9, *(len(_label(r)) for r in rows)])
    head = (
        f"{'impl':{width}} {'vocab':8} {'batch':>5} {'prec':>4} {'tokens/s (min-max)':>26} {'GFLOP/s':>8} {'MFU':>6} "
        f"{'vs textbook':>11} {'peak GiB':>9} {'-base':>6} {'analytic':>8} fits"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if r.get("fits"):
            spread = (
                "1 step*"
                if r.get("timed_warmup")
                else f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}"
            )
            speed = f"{r['tokens_per_s']:>9,.0f} ({spread})"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            print(
                f"{_label(r):{width}} {r['vocab']:8} {r['batch']:>5} {r['precision']:>4} {speed:>26} "
                f"{r['flop_per_s'] / 1e9:>8,.0f} {mfu:>6} {_ratio(r):>11} {_memory_columns(r)} yes"
            )
        else:
            print(
                f"{_label(r):{width}} {r['vocab']:8} {r['batch']:>5} {r['precision']:>4} {'-':>26} {'-':>8} {'-':>6} "
                f"{'-':>11} {_memory_columns(r)} no: {r.get('note', '')}"
            )
    print(
        "peak GiB: measured (the CPU's peak resident set, the accelerator's allocator peak); -base: less the "
        "process's own before the model; analytic: the memory account's total (an upper bound, see above); "
        "vs textbook: tokens/s over the textbook code's on the same vocabulary, in this run"
    )
    rounds = [r for r in rows if len(r.get("vs_textbook_rounds", [])) > 1 and r["impl"] != "naive"]
    if rounds:
        print(
            f"vs textbook over {len(rounds[0]['vs_textbook_rounds'])} rounds (cases in ABBA order): the median "
            "of each round's ratio; tokens/s: the median round's, min-max over all rounds"
        )
        for r in rounds:
            each = " ".join(f"{ratio:.2f}x" for ratio in r["vs_textbook_rounds"])
            print(f"  {_label(r)} {r['vocab']}: {each}")
    compared = [r for r in rows if "vs_first" in r]
    if compared:
        print(
            f"pipeline variants: tokens/s over {compared[0]['variant']}'s on the same vocabulary (the median of "
            "each round's ratio), and the first step (the warm-up, with any compilation)"
        )
        for r in compared:
            ratio = f"{r['vs_first']:.2f}x" if r.get("vs_first") is not None else "-"
            rounds = r.get("vs_first_rounds", [])
            each = f" (rounds: {' '.join(f'{x:.2f}x' for x in rounds)})" if len(rounds) > 1 else ""
            first_step = (
                f"; first step {r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else ""
            )
            print(f"  {r['variant']} {r['vocab']}: {ratio}{each}{first_step}")
    for r in rows:
        if r.get("profile"):
            ops = ", ".join(f"{op['op']} {op['share']:.1%}" for op in r["profile"])
            print(f"profile of one step, {_label(r)} {r['vocab']} ({r['precision']}): {ops}")
    if any(r.get("timed_warmup") for r in rows):
        print("1 step*: timed by its warm-up step, which alone took longer than --case-seconds")
    if generation:
        print(f"\ngeneration, batch 1, {generation[0]['gen_tokens']} new tokens (greedy)")
        for g in generation:
            mode = (
                "KV cache"
                if g["use_cache"]
                else ("textbook, no cache" if g["impl"] == "naive" else "no cache")
            )
            speed = (
                f"{g['gen_tokens_per_s']:,.0f} tokens/s ({_ratio(g)} the textbook loop)"
                if g.get("fits")
                else f"did not fit: {g.get('note', '')}"
            )
            print(f"  {g['impl']:9} {g['vocab']:8} {mode:20} {speed}")


def _memory_columns(r: dict) -> str:
    """Measured peak, less the process's own, and the analytic total; '-' where a case never got
    as far as measuring (its process died)."""
    peak, base, analytic = (r.get(key) for key in ("peak_mem_gib", "base_mem_gib", "analytic_gib"))
    measured = (
        f"{peak:>9.2f} {peak - base:>6.2f}" if peak is not None and base is not None else f"{'-':>9} {'-':>6}"
    )
    return f"{measured} {analytic:>8.2f}" if analytic is not None else f"{measured} {'-':>8}"


def _run(case: Case, batches, show_account: bool) -> dict:
    """One case in a fresh process (its memory account printed first, when asked), its row back."""
    label = f"{case.kind} {case.impl} {case.vocab}" + (
        f" {case.variant}".rstrip() if case.kind == "train" else f" cache={case.use_cache}"
    )
    print(f"  {label} ...", flush=True)
    account = case_account(case) if case.kind == "train" else None
    if account is not None and show_account:
        print("\n".join("    " + line for line in account_lines(account, scaling=False)), flush=True)
    started = time.perf_counter()
    row = in_child(case, batches)
    row["case_s"] = time.perf_counter() - started  # the case's process, start to end
    print(f"    {row['case_s']:.0f} s", flush=True)
    if account is not None:
        row |= {"analytic_gib": account.total / 2**30, "memory_account": account.to_json()}
    return row


def main(cfg: BenchmarkConfig) -> dict:
    begun = time.perf_counter()
    accelerator = accel.build_accelerator(cfg.precision, threads=cfg.threads)
    if not accelerator.is_main_process:
        return {}
    device = accelerator.device
    precision = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "no"
    data = stage.prepare_data(accelerator, cfg.data)
    mem_limit = cfg.max_mem_gib or max(available_gib() - 1.0, 1.0)
    print(
        f"benchmark of {cfg.preset} on {accel.device_description(device)}; a CPU case may take {mem_limit:.1f} GiB"
    )
    cases = list(make_cases(cfg, data, device, precision, mem_limit))
    if not cases:
        raise UsageError(
            f"nothing to measure: --vocabs {' '.join(cfg.vocabs)} left no case (see above); add --vocabs full"
        )
    out = Path(cfg.out) if cfg.out else default_run_dir("benchmark", cfg.preset)
    run = RunDir(out)
    stage.write_run_files(run, accelerator, to_dict(cfg))
    peaks = measure_peaks([case for case, _ in cases], device)
    runs: list[list[dict]] = [[] for _ in cases]
    for round_index in range(cfg.rounds):
        if cfg.rounds > 1:
            print(f"round {round_index + 1} of {cfg.rounds}", flush=True)
        for i in round_order(len(cases), round_index):
            runs[i].append(_run(*cases[i], show_account=round_index == 0))
    rows, generation = [], []
    for (case, _), case_runs in zip(cases, runs, strict=True):
        (rows if case.kind == "train" else generation).append(merge_rounds(case_runs))
    # Measured again at the end, the higher counts: a shared machine's slow moment at the start
    # would otherwise lower the peak and inflate every MFU (seen: fp32 112 against 183 GFLOP/s).
    again = measure_peaks([case for case, _ in cases], device)
    peak_runs = {key: [peaks[key], again[key]] for key in peaks}
    peaks = {key: max(runs) for key, runs in peak_runs.items()}
    rows = [add_mfu(row, peaks) for row in rows]
    add_textbook_ratios(rows, "tokens_per_s")
    add_variant_ratios(rows, "tokens_per_s")
    add_textbook_ratios(generation, "gen_tokens_per_s")
    result = {
        "device": accel.device_description(device),
        "peaks_flop_per_s": peaks,
        "peak_measurements_flop_per_s": peak_runs,  # at the start and at the end
        "rows": rows,
        "generation": generation,
        "seconds": time.perf_counter() - begun,
    }
    print_tables(rows, generation, peaks, result["device"])
    write_json(out / "benchmark.json", result)
    print(f"\nwrote {out / 'benchmark.json'} ({result['seconds']:.0f} s in all)")
    return result


if __name__ == "__main__":
    cli.run(main, cli.parse(BenchmarkConfig, PRESETS))
