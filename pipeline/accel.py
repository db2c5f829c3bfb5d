"""The one module that knows about devices, precision and processes.

It builds the `Accelerator`, resolves mixed precision, checks that the process group is what the
launcher meant, turns a collective that fails for another rank into an error naming this rank, and reads memory
statistics from whichever backend is in use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from pipeline.errors import UsageError
from pipeline.files import cache_dir


def _accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or bool(mps and mps.is_available())


def _cpuinfo() -> tuple[str, str | None]:
    """The machine (platform.machine()) and /proc/cpuinfo's text; None where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = None
    return platform.machine().lower(), text


X86 = ("x86_64", "amd64", "i386", "i686")


def _cpu_flags_verdict(machine: str, cpuinfo: str | None) -> tuple[bool | None, str]:
    """What the CPU's flags say of bf16 matmuls: True (AMX/AVX512-BF16), False (an x86 flag list
    without them: bf16 is emulated, several times slower than fp32), None when they cannot tell.

    They cannot tell without /proc/cpuinfo, nor off x86: an aarch64 "Features" line may list bf16,
    but whether the BFMMLA path beats fp32 depends on the core and torch's build, so it is measured.
    """
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo or "", re.MULTILINE)
    if machine not in X86 or flags is None:
        return None, ""
    found = [name for name in ("amx_bf16", "avx512_bf16") if name in flags.group(1).split()]
    if found:
        return True, f"cpu flags: {', '.join(found)}"
    return False, "cpu flags: no amx_bf16/avx512_bf16 (bf16 emulated)"


_clock = time.perf_counter
MATMUL_SIZES = (128, 256, 512)
"""Square sizes measured in turn, small first, so that an emulated bf16 is found slow before a big one runs."""
MATMUL_CAP_S = 0.05
"""One matmul slower than this ends its timing: no repetitions, and no larger size."""
MEASURE_BUDGET_S = 1.0
"""The whole measurement's bound, warm-ups included: a larger size runs only if it fits in what is left."""
MATMUL_REPEATS = 3
"""Timed matmuls after each warm-up; the best one counts (the least disturbed by other work)."""
BF16_MIN_SPEEDUP = 1.3
"""bf16 is chosen only when it beats fp32 by this much: a near tie is not worth bf16's rounding."""


def _time_matmul(n: int, dtype: torch.dtype) -> float:
    """Seconds of one n x n matmul in `dtype` on the CPU: a warm-up, then the best of MATMUL_REPEATS.

    A warm-up slower than MATMUL_CAP_S is the answer itself: repeating it would only spend time.
    """
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    start = _clock()
    torch.matmul(a, b)
    best = _clock() - start
    if best > MATMUL_CAP_S:
        return best
    for _ in range(MATMUL_REPEATS):
        start = _clock()
        torch.matmul(a, b)
        best = min(best, _clock() - start)
    return best


def _measure_bf16() -> tuple[bool, str]:
    """bf16 against fp32 square matmuls, growing sizes within MEASURE_BUDGET_S; the largest size decides."""
    spent, size, fp32, bf16 = 0.0, 0, 0.0, 0.0
    for n in MATMUL_SIZES:
        # The next size costs (n / size)^3 times the last; it runs only if no matmul hit the cap and it fits.
        next_cost = (n / size) ** 3 * (fp32 + bf16) * (1 + MATMUL_REPEATS) if size else 0.0
        if size and (max(fp32, bf16) > MATMUL_CAP_S or spent + next_cost > MEASURE_BUDGET_S):
            break
        fp32, bf16 = _time_matmul(n, torch.float32), _time_matmul(n, torch.bfloat16)
        spent += (fp32 + bf16) * (1 + MATMUL_REPEATS)  # an upper bound: a capped timing runs once
        size = n
    speedup = fp32 / max(bf16, 1e-12)
    fast = speedup >= BF16_MIN_SPEEDUP
    verdict = "" if fast else " (fp32 chosen)"
    return fast, f"measured: bf16 {speedup:.1f}x fp32 on {size}^2 matmuls{verdict}"


@functools.cache
def cpu_bf16_decision() -> tuple[bool, str]:
    """Whether bf16 autocast pays on this CPU, and why: its flags where they tell, else a measurement.

    x86 flags decide without timing anything (AMX or AVX512-BF16: bf16 matmuls beat fp32
    severalfold; neither: bf16 is emulated and far slower). Elsewhere (macOS, aarch64) at most a
    second of fp32 and bf16 matmuls decides (`_measure_bf16`). Cached: one decision per process.
    """
    fast, reason = _cpu_flags_verdict(*_cpuinfo())
    if fast is None:
        return _measure_bf16()
    return fast, reason


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls beat fp32 on this CPU (see `cpu_bf16_decision`)."""
    return cpu_bf16_decision()[0]


_precision_decision: tuple[str, str] | None = None  # the last resolve_precision's answer and why


def last_precision_decision() -> tuple[str, str] | None:
    """The last `resolve_precision` answer and how it was reached, e.g. ("bf16", "auto: cpu flags:
    avx512_bf16"), for env.json; None before any."""
    return _precision_decision


def resolve_precision(requested: str, device_type: str) -> str:
    """'no', 'bf16' or 'fp16' for this device from the --train.precision value.

    auto: the launch configuration's bf16/fp16 when it asks for one, else bf16 where the device runs
    it fast (CUDA/XPU with bf16; on a CPU, see `cpu_bf16_decision`), else fp32. fp16 on a CPU becomes
    bf16 with a warning (Accelerate would silently ignore it). `last_precision_decision()` then says why.
    """
    global _precision_decision
    reason = f"requested: {requested}"
    if requested == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launched in ("bf16", "fp16"):
            requested, reason = launched, f"auto: the launch configuration asks for {launched}"
        elif device_type == "cuda":
            supported = torch.cuda.is_bf16_supported()
            requested = "bf16" if supported else "no"
            reason = f"auto: the cuda device {'supports' if supported else 'lacks'} bf16"
        elif device_type == "xpu":
            requested, reason = "bf16", "auto: xpu runs bf16"
        elif device_type == "cpu":
            fast, why = cpu_bf16_decision()
            requested, reason = ("bf16" if fast else "no"), f"auto: {why}"
        else:
            requested, reason = "no", f"auto: fp32 on {device_type}"
    if requested == "fp16" and device_type == "cpu":
        warnings.warn("fp16 autocast does not run on the CPU; training in bf16 instead", stacklevel=2)
        requested, reason = "bf16", f"{reason}; fp16 does not run on the CPU, bf16 instead"
    _precision_decision = (requested, reason)
    return requested


# PyTorch reads this once, at its first CPU allocation, so it is set here, on import, before any
# tensor exists: CPU tensors of 2 MiB and more get transparent huge pages (see tune_cpu_allocator).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

MMAP_THRESHOLD = 64 * 2**20  # bytes; glibc maps blocks this large fresh and returns them when freed


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc), except blocks of MMAP_THRESHOLD and more.

    A training step allocates the same tensors again and again. By default glibc serves any block
    over a moving threshold (128 KiB at first) from a fresh mmap, whose page faults cost time every
    step; raising the mmap and trim thresholds makes it reuse freed blocks instead. Blocks of 64 MiB
    and more (a 200k-class head's logits chunk and gradients) still get fresh mappings and go back
    to the system when freed: kept in the heap they fragmented it, and the seed preset's process
    grew 0.14-0.2 GiB past what it holds at once (2.20-2.44 GiB instead of 2.0-2.07, measured on a
    2-core EPYC). Those mappings use 2 MiB transparent huge pages (THP_MEM_ALLOC_ENABLE, set on
    import): 512 times fewer page faults, and the seed step was no slower than with the heap.
    Returns whether the setting took effect (glibc on Linux only).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    )


def attention_kernel(device: torch.device, precision: str) -> str:
    """The faster attention implementation here (measured on a 2-core CPU, fwd+bwd):

    in bf16 on a CPU, plain matmuls + softmax beat torch's flash kernel 2-5x (B=12, T=64: 0.9 vs
    5.1 ms; B=32, T=256: 30 vs 61 ms); in fp32 and on GPUs the fused kernel wins.
    """
    return "matmul" if device.type == "cpu" and precision in ("bf16", "fp16") else "sdpa"


def inference_dtype(precision: str) -> torch.dtype:
    """Weights dtype for generation: with mixed precision, cast once instead of at every token.

    Under autocast a model keeps fp32 weights and casts each one at every call; for one token at a
    time that cast (205 MB for a 200k x 256 head) costs more than the token's arithmetic.
    """
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_accelerator(
    precision: str = "auto",
    project_dir: Path | None = None,
    log_with: str | None = None,
    threads: int = 0,
    dist_timeout: float = 1800.0,
) -> Accelerator:
    """The run's Accelerator; refuses a process group that differs from what the launcher started.

    `dist_timeout`: seconds a collective waits for the other processes before it fails (gloo applies
    the process group's timeout to every collective; NCCL to its watchdog).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # `accelerate launch --multi_gpu` on a machine without GPUs starts processes that each think
    # they are alone; on such a machine a multi-process launch means CPU processes over gloo.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or (
        world > 1 and not _accelerator_available()
    )
    global _dist_timeout_s
    _dist_timeout_s = dist_timeout
    probe_device = "cpu" if cpu or not _accelerator_available() else _default_device_type()
    mixed = resolve_precision(precision, probe_device)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        log_with=log_with,
        # Trackers need a folder at construction; the Reporter points them at the run folder.
        project_dir=str(project_dir or "runs") if log_with else None,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            _process_group_kwargs(dist_timeout),
        ],
    )
    check_world_size(accelerator)
    if accelerator.is_main_process and (note := explain_launch_notice()):
        print(note, file=sys.stderr, flush=True)  # beside Accelerate's own notice, which goes to stderr
    if accelerator.device.type == "cpu":
        tune_cpu_allocator()
        configure_cpu_threads(threads)
    return accelerator


_dist_timeout_s: float | None = None  # the process group's, for the messages of its timeouts


def _process_group_kwargs(seconds: float) -> InitProcessGroupKwargs:
    timeout = timedelta(seconds=seconds)
    # Accelerate passes on only values that differ from its defaults (600 s, NCCL's); gloo would then
    # fall back to torch's 1800 s. A microsecond more keeps 600 s meaning 600 s on every backend.
    if timeout == timedelta(seconds=600):
        timeout += timedelta(microseconds=1)
    return InitProcessGroupKwargs(timeout=timeout)


class CollectiveFailure(RuntimeError):
    """A collective failed because of another process: it stalled past the timeout, or crashed."""


def collective_failure(err: BaseException, operation: str) -> str | None:
    """`rank R: <operation> timed out after N s waiting for the other processes ...` (or the crash
    counterpart) when `err` is a collective failing because of another process; None for any other error.

    gloo says 'Timed out waiting 5000ms for recv', NCCL's watchdog 'collective operation timeout';
    a peer that died shows as 'Connection closed by peer' (gloo) or 'reset by peer'.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(err, RuntimeError):
        return None
    text, rank = str(err).lower(), os.environ.get("RANK", "0")
    if "timed out" in text or "operation timeout" in text:
        after = f" after {_dist_timeout_s:g} s" if _dist_timeout_s is not None else ""
        return (
            f"rank {rank}: {operation} timed out{after} waiting for the other processes (a stalled or crashed "
            f"rank); check the other ranks' output, or raise --train.dist-timeout if a rank is legitimately "
            f"slow (e.g. a long evaluation or checkpoint on one rank)"
        )
    if "closed by peer" in text or "reset by peer" in text:
        return (
            f"rank {rank}: {operation} failed: another process closed its connection (it crashed or was "
            f"killed); its own output says why"
        )
    return None


@contextlib.contextmanager
def collective(operation: str) -> Iterator[None]:
    """Turn a collective that fails because of another process into a CollectiveFailure naming this rank and `operation`."""
    try:
        yield
    except RuntimeError as err:
        message = None if isinstance(err, CollectiveFailure) else collective_failure(err, operation)
        if message is None:
            raise
        raise CollectiveFailure(message) from err


def _default_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch, "xpu", None) and torch.xpu.is_available():
        return "xpu"
    return "mps"


def check_world_size(accelerator: Accelerator) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise UsageError(
            f"the launcher started WORLD_SIZE={world} processes but Accelerate sees {accelerator.num_processes}; "
            f"on CPUs launch with: accelerate launch --config_file launch/cpu_ddp.yaml ..."
        )
    asked = _launcher_num_processes()
    if asked and asked > 1 and accelerator.num_processes == 1:
        raise UsageError(
            f"accelerate launch was asked for {asked} processes but started one (it does so with --cpu); "
            f"use: accelerate launch --config_file launch/cpu_ddp.yaml ... "
            f"(or ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {asked} ...)"
        )


def _launcher_args() -> list[str] | None:
    """The command line of an `accelerate launch` parent process, when there is one (Linux)."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return args if any(a.endswith("accelerate") or a == "launch" for a in args[:3]) else None


LAUNCH_NOTICE_NOTE = "accelerate-launch-notice.explained"
"""Marker file in the project's cache: Accelerate's launch-defaults notice has been explained on this machine."""


def explain_launch_notice() -> str | None:
    """One line on Accelerate's "values were not passed to `accelerate launch`" notice, the first time it shows.

    `accelerate launch` without --config_file and without a default config (`accelerate config`)
    lists the defaults it picked (`--num_processes` of 0 on a CPU means one process). Nothing is
    wrong, and the notice cannot be turned off from inside the script: the line says so and how to
    silence it, once per machine (a marker in ~/.cache/gpt-distill). None when there is nothing to explain.
    """
    args = _launcher_args()
    if args is None or any(a.startswith(("--config_file", "--config-file")) for a in args):
        return None
    from accelerate.commands.config import default_config_file

    marker = cache_dir() / LAUNCH_NOTICE_NOTE
    if Path(default_config_file).is_file() or marker.exists():
        return None
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return (
        "note: Accelerate's notice above (values not passed to `accelerate launch`) is harmless: without a launch "
        "config it picks defaults, here what this run needs. To silence it, run `accelerate config default` once, "
        "or pass --config_file launch/cpu.yaml (gpu.yaml, gpu_ddp.yaml, ...: README, Launching). Shown once."
    )


def _user_omp_threads() -> int | None:
    """OMP_NUM_THREADS as the user set it: under `accelerate launch`, the launcher's environment."""
    env = os.environ
    if _launcher_args() is not None:
        try:
            raw = Path(f"/proc/{os.getppid()}/environ").read_bytes().decode(errors="replace")
            env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        except OSError:
            pass
    value = env.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def configure_cpu_threads(requested: int = 0) -> int:
    """Set torch's CPU threads: `requested`, else the user's OMP_NUM_THREADS, else cores / local processes.

    `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 in every process it starts, which
    halves a 2-core machine's speed; a value the user exported is kept as it is.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = requested or _user_omp_threads() or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def _launcher_num_processes() -> int | None:
    """--num_processes of an `accelerate launch` parent process, when there is one (Linux)."""
    args = _launcher_args()
    if args is None:
        return None
    for i, arg in enumerate(args):
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(args):
            return int(args[i + 1]) if args[i + 1].isdigit() else None
        if arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
            return int(value) if value.isdigit() else None
    return None


# --------------------------------------------------------------------------------------------------
# Descriptions and memory
# --------------------------------------------------------------------------------------------------


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "xpu":
        return f"xpu: {torch.xpu.get_device_name(device)}"
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"cpu: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return device.type


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        with contextlib.suppress(OSError):  # Linux: writing 5 resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: allocator peak on GPUs, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "xpu":
        return torch.xpu.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def profile_ops(device: torch.device, fn: Callable[[], object]) -> list[tuple[str, float]]:
    """(op, own seconds) of every op one call of fn() ran, under torch.profiler.

    Own time excludes the ops an op calls. On a GPU it is the time of the op's kernels on the device
    (the host only queues them); on a CPU, the op's CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    # getattr: a torch older than its XPU profiling has no ProfilerActivity.XPU (pyproject allows 2.4).
    kernels = {"cuda": ProfilerActivity.CUDA, "xpu": getattr(ProfilerActivity, "XPU", None)}.get(device.type)
    activities = [ProfilerActivity.CPU] + ([kernels] if kernels is not None else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    own = "self_device_time_total" if kernels is not None else "self_cpu_time_total"
    return [(event.key, getattr(event, own) / 1e6) for event in prof.key_averages()]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
