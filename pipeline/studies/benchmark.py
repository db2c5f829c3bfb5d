"""Measuring training and generation speed: the textbook reference, FLOP counts, matmul peaks.

`NaiveGPT` is the exercise sheet's textbook code, kept only as the benchmark's reference: manual
attention with a -1e9 mask, full (B, T, V) logits, then cross-entropy, in fp32. Each benchmark case
runs in a fresh process (`run_case` under multiprocessing's spawn), so peak memory is per case and a
case that does not fit fails alone: on the CPU the child's address space is capped at the limit.
`case_account` gives a training case's analytic memory (pipeline/model/memory.py) to set beside it.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import accel
from pipeline.config import ModelConfig, OptimConfig
from pipeline.model.generation import SamplingConfig, generate
from pipeline.model.gpt import GPT
from pipeline.model.memory import MemoryAccount, memory_account
from pipeline.train.losses import CrossEntropyHead, loss_chunk_rows
from pipeline.train.optim import build_optimizer

# --------------------------------------------------------------------------------------------------
# The textbook reference
# --------------------------------------------------------------------------------------------------


class NaiveAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.w_o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        mask = torch.tril(torch.ones(T, T, device=x.device))
        scores = scores.masked_fill(mask == 0, -1e9)
        out = scores.softmax(dim=-1) @ v
        return self.w_o(out.transpose(1, 2).contiguous().view(B, T, C))


class NaiveGPT(nn.Module):
    """Token + learned position embeddings, blocks as the config says, a full-vocabulary head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.attn = nn.ModuleList(NaiveAttention(cfg) for _ in range(cfg.n_layers))
        self.ln1 = (
            nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
            if cfg.use_layernorm
            else None
        )
        self.ln2 = (
            nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layers)) if cfg.use_ffn else None
        )
        hidden = cfg.ffn_mult * cfg.d_model
        self.ffn = (
            nn.ModuleList(
                nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))
                for _ in range(cfg.n_layers)
            )
            if cfg.use_ffn
            else None
        )
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        position_ids = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(position_ids)
        for i, attn in enumerate(self.attn):
            a = attn(self.ln1[i](x) if self.ln1 is not None else x)
            x = x + a if self.cfg.use_residual else a
            if self.ffn is not None:
                f = self.ffn[i](self.ln2[i](x))
                x = x + f if self.cfg.use_residual else f
        return self.head(x)  # (B, T, V): every logit, every position

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------------------
# FLOPs and peaks
# --------------------------------------------------------------------------------------------------


def train_flops_per_token(cfg: ModelConfig, n_classes: int, seq_len: int) -> float:
    """6 x matmul parameters + 12 x layers x d_model x seq_len (PaLM's count: dense attention)."""
    d = cfg.d_model
    per_layer = 4 * d * d + (2 * cfg.ffn_mult * d * d if cfg.use_ffn else 0)
    matmul_params = cfg.n_layers * per_layer + d * n_classes
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * d * seq_len


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_key(precision: str) -> str:
    """The matmul peak a case's precision ('no', 'bf16', 'fp16') runs against: 'fp32', 'bf16' or 'fp16'."""
    return precision if precision in ("bf16", "fp16") else "fp32"


@dataclass
class MatmulPeak:
    flop_per_s: float  # the best over every timed matmul
    size: int  # the largest square size that was timed
    matmuls: int  # matmuls run, warm-ups included
    seconds: float  # wall time from the end of the first warm-up


def measure_matmul_peak(
    dtype: torch.dtype,
    device: torch.device,
    max_size: int = 0,
    min_size: int = 128,
    target_s: float = 0.05,
    time_cap_s: float = 1.5,
    repeats: int = 3,
) -> MatmulPeak:
    """FLOP/s of square matmuls in `dtype`, time-bounded whatever the hardware's speed in that dtype.

    From `min_size` the size doubles while one matmul takes under `target_s` (larger matmuls run
    closer to the peak) and stays at most `max_size` (0: 8192 on an accelerator, 2048 on a CPU).
    A size starts only when its warm-up and `repeats` timed matmuls, estimated at 8x the last size's
    time, fit in what is left of `time_cap_s`; within a size no further repetition starts once the cap
    is spent. So a dtype the CPU only emulates (bf16 without AMX or AVX512-BF16: ~1 GFLOP/s) is
    measured on a small matmul in about `time_cap_s`, not 2048^2 ones for minutes. The clock starts
    after the first warm-up, so a library's one-time start (cuBLAS handles) does not eat the cap.
    """
    max_size = max_size or (8192 if device.type != "cpu" else 2048)
    size = min(min_size, max_size)
    best, matmuls, start = 0.0, 0, None
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection, workspace
        accel.synchronize(device)
        matmuls += 1
        if start is None:
            start = time.perf_counter()
        fastest = math.inf
        for i in range(repeats):
            if i and time.perf_counter() - start >= time_cap_s:
                break
            accel.synchronize(device)
            t0 = time.perf_counter()
            a @ b
            accel.synchronize(device)
            fastest = min(fastest, time.perf_counter() - t0)
            matmuls += 1
        best = max(best, 2 * size**3 / fastest)
        left = time_cap_s - (time.perf_counter() - start)
        if fastest >= target_s or 2 * size > max_size or 8 * fastest * (1 + repeats) > left:
            return MatmulPeak(best, size, matmuls, time.perf_counter() - start)
        size *= 2


def matmul_peak(dtype: torch.dtype, device: torch.device, **kw: Any) -> float:
    """Measured FLOP/s of a square matmul in `dtype` (see `measure_matmul_peak`)."""
    return measure_matmul_peak(dtype, device, **kw).flop_per_s


# --------------------------------------------------------------------------------------------------
# One case in a fresh process
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str  # "train" or "generate"
    impl: str  # "naive" or "pipeline"
    vocab: str  # "full" or "compact"
    model: dict[str, Any]  # ModelConfig fields, vocab_size = the model's classes
    batch: int
    seq_len: int
    precision: str  # "no" or "bf16"/"fp16" (pipeline only)
    device: str
    warmup: int
    repeats: int
    mem_limit_gib: float
    threads: int
    gen_tokens: int = 0
    use_cache: bool = True
    compile: bool = False
    optimizer: str = "fused"  # AdamW's kernel: "fused" or "foreach" (the pipeline), "loop" (the textbook)
    variant: str = ""  # the pipeline's settings as --variants names them ("eager", "compiled-foreach", ...)
    seed: int = 0
    budget_s: float = 0.0  # no further repetition starts once the timed ones took this long; 0: all
    min_timed_s: float = (
        0.0  # short steps repeat past `repeats` until the timed ones fill this (MAX_REPEATS at most)
    )
    checkpointing: bool = False  # activation checkpointing (pipeline only)
    profile: bool = False  # after timing, one more step under torch.profiler (training cases)


def case_account(case: Case) -> MemoryAccount:
    """The analytic memory of a training case (pipeline/model/memory.py), on the path the case runs.

    The textbook code: fp32, materialised (B, H, T, T) attention, full logits (its separate q/k/v
    Linears and missing final LayerNorm change the count by a few d_model-sized tensors). The
    pipeline: the fused loss's chunk, and the attention kernel accel picks for the device.
    """
    cfg = ModelConfig(**case.model)
    if case.impl == "naive":
        return memory_account(cfg, case.batch, case.seq_len, precision="no", attention_kernel="matmul")
    kernel = accel.attention_kernel(torch.device(case.device), case.precision)
    rows = loss_chunk_rows(cfg.vocab_size)
    return memory_account(
        cfg, case.batch, case.seq_len, precision=case.precision, chunk_rows=rows,
        checkpointing=case.checkpointing, attention_kernel=kernel,
    )  # fmt: skip


WARMUP_TOKENS = 16  # a warm-up generation only has to touch every code path and buffer once


MAX_REPEATS = 500  # the most timed repetitions `min_timed_s` adds


def _timed(case: Case, device: torch.device, fn, first: int = 0) -> list[float]:
    """Seconds of each timed repetition of fn(i), i from `first`.

    case.repeats of them, fewer once case.budget_s is spent (at least one runs), and more while they
    fill less than case.min_timed_s: a 40 ms step is then the median of ~50, not of 3.
    """
    times: list[float] = []
    while True:
        spent, n = sum(times), len(times)
        if times and case.budget_s and spent >= case.budget_s:
            break
        if n >= case.repeats and (spent >= case.min_timed_s or n >= MAX_REPEATS):
            break
        times.append(_seconds(device, fn, first + n))
    return times


def _seconds(device: torch.device, fn, i: int) -> float:
    """Wall time of fn(i), the device's queue drained before and after."""
    accel.synchronize(device)
    start = time.perf_counter()
    fn(i)
    accel.synchronize(device)
    return time.perf_counter() - start


def run_case(case: Case, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """Time one case; `fits` is False when it runs out of memory."""
    device = torch.device(case.device)
    if device.type == "cpu":
        _cap_address_space(case.mem_limit_gib)
        torch.set_num_threads(case.threads)
        if case.impl == "pipeline":
            accel.tune_cpu_allocator()
    row: dict[str, Any] = {
        k: v for k, v in asdict(case).items() if k not in ("model", "mem_limit_gib", "seed")
    }
    accel.reset_peak_memory(device)
    row["base_mem_gib"] = accel.peak_memory_gib(device)  # before the model: the process's own (CPU RSS)
    try:
        torch.manual_seed(case.seed)
        cfg = ModelConfig(**case.model)
        if case.kind == "train":
            row.update(_time_training(case, cfg, batches, device))
        else:
            row.update(_time_generation(case, cfg, batches[0][0][:1, :1], device))
        row["fits"] = True
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        row.update(fits=False, note=f"out of memory ({str(err).splitlines()[0][:120]})")
    row["peak_mem_gib"] = accel.peak_memory_gib(device)
    return row


def available_gib() -> float:
    """Memory the kernel says is available (Linux's MemAvailable); 8 GiB where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def in_child(case: Case, batches) -> dict:
    """Run one case in a fresh process; a process that raises or dies (say, by the kernel's OOM
    killer) counts as not fitting, with a note that says what happened."""
    outcome, value = in_fresh_process(run_case, case, batches)
    if outcome == "ok":
        return value
    if outcome == "died" and case.device == "cpu":
        value += f"; it ran under an address-space cap of {case.mem_limit_gib:.2f} GiB (--max-mem-gib)"
    return asdict(case) | {"fits": False, "note": value[:240]}


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """fn(*args) in a spawned process: ("ok", its value), ("raised", the exception as text) or
    ("died", how the process ended) when it ended before it answered.

    A bare Process and a pipe, not multiprocessing.Pool: a Pool whose worker is killed waits for
    its answer forever, so one case taken by the OOM killer would hang the whole benchmark. The
    child returns from its target and exits on its own, which shuts down what it started
    (torch.compile's compile workers, whose semaphores would otherwise leak).
    """
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_answer, args=(send, fn, args))
    proc.start()
    send.close()  # the child holds the only writing end: its death reads as EOF here
    try:
        try:
            answer = receive.recv()
        except EOFError:
            answer = None
        proc.join()  # after answering it exits on its own (see above): wait, never terminate
    except BaseException:  # interrupted here (Ctrl-C): take the case down too
        proc.terminate()
        proc.join()
        raise
    finally:
        receive.close()
    return answer if answer is not None else ("died", _death(proc.exitcode))


def _answer(send, fn: Callable[..., Any], args: tuple) -> None:
    try:
        answer = ("ok", fn(*args))
    except Exception as err:
        answer = ("raised", f"{type(err).__name__}: {err}")
    send.send(answer)
    send.close()


def _death(exitcode: int | None) -> str:
    """Why a case's process ended without an answer, from its exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:  # a real-time signal has no name of its own
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"its process was killed ({name}: the kernel's out-of-memory killer, or a kill)"
        return f"its process died of {name}"
    return f"its process exited with code {exitcode} before it reported (see its messages above)"


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a case's rows of one or more rounds (--rounds).

    A round that did not fit makes the case not fit (that round's row, with its note). Otherwise the
    row is the round of median speed (the lower middle one of an even count), so its speed, step
    time and FLOP/s stay one measurement's; its min and max widen to every round's, its peak memory
    (and the process's own before the model) is the highest round's, and `<speed>_rounds` keeps
    each round's speed for the per-round ratios.
    """
    failed = [run for run in runs if not run.get("fits")]
    if failed:
        return failed[0] | {"rounds": len(runs)}
    key = "tokens_per_s" if "tokens_per_s" in runs[0] else "gen_tokens_per_s"
    speeds = [run[key] for run in runs]
    row = dict(next(run for run in runs if run[key] == statistics.median_low(speeds)))
    row[f"{key}_min"] = min(run[f"{key}_min"] for run in runs)
    row[f"{key}_max"] = max(run[f"{key}_max"] for run in runs)
    highest = max(runs, key=lambda run: run["peak_mem_gib"])
    row["peak_mem_gib"], row["base_mem_gib"] = highest["peak_mem_gib"], highest["base_mem_gib"]
    for total in ("case_s", "timed_steps"):
        if all(total in run for run in runs):
            row[total] = sum(run[total] for run in runs)
    return row | {f"{key}_rounds": speeds, "rounds": len(runs)}


def round_order(n_cases: int, round_index: int) -> list[int]:
    """The cases' order in one round: forward in even rounds, backward in odd ones (ABBA), so a
    machine that slows down or speeds up steadily favours no case over the run."""
    order = list(range(n_cases))
    return order[::-1] if round_index % 2 else order


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return (
        isinstance(err, torch.OutOfMemoryError | MemoryError)
        or "can't allocate" in text
        or "out of memory" in text
    )


def _cap_address_space(limit_gib: float) -> None:
    import resource

    limit = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _time_training(case: Case, cfg: ModelConfig, batches, device: torch.device) -> dict[str, Any]:
    if case.impl == "naive":
        model = NaiveGPT(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    else:
        model = GPT(cfg).to(device)
        model.set_attention_kernel(accel.attention_kernel(device, case.precision))
        model.activation_checkpointing = case.checkpointing
        fused = case.optimizer == "fused"
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4), fused=fused, foreach=not fused)
    run = torch.compile(model) if case.compile else model

    def step(i: int) -> None:
        x, y = (t.to(device) for t in batches[i % len(batches)])
        if case.impl == "naive":
            loss = model.loss(x, y)
        else:
            with _autocast(device, case.precision):
                loss = run(x, head_fn=CrossEntropyHead(y)) / y.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup: list[float] = []
    least = max(case.warmup, 1 if case.compile else 0)  # a compiled model's first step compiles it
    while len(warmup) < least or (warmup and sum(warmup) < case.min_timed_s / 4):
        warmup.append(_seconds(device, step, len(warmup)))
    # A warm-up step longer than the whole budget is timed as it is, instead of running another:
    # at that length (the textbook step at full vocabulary: ~1 min on 2 cores) the one-time costs
    # of a first step are a few percent, and a second step would double the case's time. Not the
    # step that compiled the model, though: that one times the compiler (gpt2_small at batch 1 on
    # 2 cores: 36 s against a 3.5 s step).
    compiling = case.compile and len(warmup) == 1
    timed_warmup = bool(warmup and case.budget_s and warmup[-1] > case.budget_s and not compiling)
    if timed_warmup:
        times = warmup[-1:]
    else:
        accel.reset_peak_memory(device)
        times = _timed(case, device, step, first=len(warmup))
    tokens = case.batch * case.seq_len
    median = statistics.median(times)
    profiled = {"profile": profile_step(device, step, len(warmup) + len(times))} if case.profile else {}
    return profiled | {
        "warmup_steps": len(warmup),
        "first_step_s": warmup[0] if warmup else None,  # with --compile: the compilation's cost
        "timed_warmup": timed_warmup,
        "timed_steps": len(times),
        "step_s": median,
        "tokens_per_s": tokens / median,
        "tokens_per_s_min": tokens / max(times),
        "tokens_per_s_max": tokens / min(times),
        "flop_per_s": train_flops_per_token(cfg, cfg.vocab_size, case.seq_len) * tokens / median,
    }


PROFILE_OPS = 8  # ops a profile keeps, by their own time


def profile_step(device: torch.device, fn, i: int) -> list[dict[str, Any]]:
    """The ops that took most of one fn(i) (accel.profile_ops): name, own seconds, share of the step.

    The shares of all ops sum to 1, so the top ones say what bounds a step.
    """
    own = accel.profile_ops(device, lambda: fn(i))
    total = sum(seconds for _, seconds in own) or 1.0
    top = sorted(own, key=lambda item: -item[1])[:PROFILE_OPS]
    return [{"op": name, "self_s": seconds, "share": seconds / total} for name, seconds in top]


@torch.no_grad()
def _time_generation(case: Case, cfg: ModelConfig, prompt: Tensor, device: torch.device) -> dict[str, Any]:
    prompt = prompt.to(device)
    if case.impl == "naive":
        model = NaiveGPT(cfg).to(device).eval()

        def run(n: int) -> None:  # the textbook loop: the whole context, every logit, every step
            tokens = prompt
            for _ in range(n):
                logits = model(tokens[:, -cfg.max_seq_len :])
                tokens = torch.cat((tokens, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    else:
        model = GPT(cfg).to(device, accel.inference_dtype(case.precision)).eval()

        def run(n: int) -> None:
            generate(
                model, prompt, SamplingConfig(max_new_tokens=n, temperature=0.0, use_cache=case.use_cache)
            )

    for _ in range(case.warmup):
        run(min(case.gen_tokens, WARMUP_TOKENS))
    times = _timed(case, device, lambda _: run(case.gen_tokens))
    median = statistics.median(times)
    return {
        "gen_tokens_per_s": case.gen_tokens / median,
        "gen_tokens_per_s_min": case.gen_tokens / max(times),
        "gen_tokens_per_s_max": case.gen_tokens / min(times),
    }
