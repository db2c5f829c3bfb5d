"""Device, precision and process decisions (pipeline/accel.py), checked on the CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline import accel


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_request_then_user_env_then_cores(monkeypatch, restore_threads):
    monkeypatch.setattr(accel, "_launcher_args", lambda: None)  # not under accelerate launch
    assert accel.configure_cpu_threads(3) == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert accel.configure_cpu_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert accel.configure_cpu_threads() == max(1, os.cpu_count() or 1)


def test_precision_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert accel.resolve_precision("no", "cpu") == "no"
    assert accel.resolve_precision("auto", "cpu") == ("bf16" if accel.cpu_has_fast_bf16() else "no")
    with pytest.warns(UserWarning, match="fp16"):
        assert accel.resolve_precision("fp16", "cpu") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert accel.resolve_precision("auto", "cpu") == "bf16"


AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AARCH64_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be another CPU: `cpu(machine, cpuinfo, timings)`; a matmul timed without `timings` fails the test."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    def pretend(machine: str, cpuinfo: str | None, timings=None) -> list[tuple[int, torch.dtype]]:
        asked: list[tuple[int, torch.dtype]] = []  # the (size, dtype) of every matmul timed

        def time_matmul(n: int, dtype: torch.dtype) -> float:
            assert timings is not None, "the CPU flags should have decided without timing a matmul"
            asked.append((n, dtype))
            return timings(n, dtype)

        monkeypatch.setattr(accel, "_cpuinfo", lambda: (machine, cpuinfo))
        monkeypatch.setattr(accel, "_time_matmul", time_matmul)
        accel.cpu_bf16_decision.cache_clear()
        return asked

    yield pretend
    accel.cpu_bf16_decision.cache_clear()


def test_cpu_flags_with_bf16_instructions_choose_bf16_without_measuring(cpu):
    cpu("x86_64", AVX512_BF16)
    assert accel.cpu_bf16_decision() == (True, "cpu flags: amx_bf16, avx512_bf16")
    assert accel.resolve_precision("auto", "cpu") == "bf16"
    assert accel.last_precision_decision() == ("bf16", "auto: cpu flags: amx_bf16, avx512_bf16")


def test_x86_flags_without_them_choose_fp32_without_measuring(cpu):
    cpu("x86_64", AVX2_ONLY)
    assert accel.cpu_bf16_decision() == (False, "cpu flags: no amx_bf16/avx512_bf16 (bf16 emulated)")
    assert accel.resolve_precision("auto", "cpu") == "no"
    assert accel.last_precision_decision() == (
        "no",
        "auto: cpu flags: no amx_bf16/avx512_bf16 (bf16 emulated)",
    )
    assert accel.resolve_precision("bf16", "cpu") == "bf16"  # a request is kept, whatever the flags say
    assert accel.last_precision_decision() == ("bf16", "requested: bf16")


@pytest.mark.parametrize(
    "machine, cpuinfo",
    [("arm64", None), ("aarch64", AARCH64_BF16), ("aarch64", "Features\t: fp asimd\n"), ("x86_64", None)],
    ids=["macos", "aarch64-bf16", "aarch64", "x86-no-cpuinfo"],
)
def test_a_cpu_whose_flags_cannot_tell_is_measured(cpu, machine, cpuinfo):
    fast = lambda n, dtype: 1e-4 if dtype == torch.bfloat16 else 3e-4  # noqa: E731
    asked = cpu(machine, cpuinfo, fast)
    assert accel.cpu_bf16_decision() == (True, "measured: bf16 3.0x fp32 on 512^2 matmuls")
    assert {dtype for _, dtype in asked} == {torch.float32, torch.bfloat16}
    assert accel.resolve_precision("auto", "cpu") == "bf16"
    assert len(asked) == 2 * len(accel.MATMUL_SIZES)  # cached: resolving again measured nothing more

    slow = lambda n, dtype: 3e-4 if dtype == torch.bfloat16 else 1e-4  # noqa: E731
    cpu(machine, cpuinfo, slow)
    assert accel.cpu_bf16_decision() == (False, "measured: bf16 0.3x fp32 on 512^2 matmuls (fp32 chosen)")
    assert accel.resolve_precision("auto", "cpu") == "no"


def test_a_near_tie_keeps_fp32(cpu):
    cpu("arm64", None, lambda n, dtype: 1e-4 if dtype == torch.bfloat16 else 1.2e-4)
    assert accel.cpu_bf16_decision()[0] is False  # 1.2x is under BF16_MIN_SPEEDUP


def test_the_measurement_stops_at_a_slow_matmul_and_within_its_budget(cpu):
    # Emulated bf16: half a second for the smallest size. Nothing larger is timed, and fp32 wins.
    emulated = lambda n, dtype: 0.5 if dtype == torch.bfloat16 else 1e-4  # noqa: E731
    asked = cpu("arm64", None, emulated)
    fast, reason = accel.cpu_bf16_decision()
    assert not fast and f"on {accel.MATMUL_SIZES[0]}^2 matmuls" in reason
    assert {n for n, _ in asked} == {accel.MATMUL_SIZES[0]}

    # Cubic timings under the per-matmul cap: a size runs only while its estimated cost fits the budget.
    cubic = lambda n, dtype: 0.03 * (n / 256) ** 3  # noqa: E731
    asked = cpu("arm64", None, cubic)
    accel.cpu_bf16_decision()
    sizes = sorted({n for n, _ in asked})
    assert sizes == [128, 256]  # 512 would cost 8 x 0.06 s x (1 + repeats), past the 1 s budget
    spent = sum(cubic(n, dtype) * (1 + accel.MATMUL_REPEATS) for n, dtype in asked)
    assert spent <= accel.MEASURE_BUDGET_S


def test_one_matmul_past_the_cap_is_not_repeated(monkeypatch):
    reads = []

    def clock(step: float):
        def read() -> float:
            reads.append(None)
            return len(reads) * step

        return read

    monkeypatch.setattr(accel, "_clock", clock(1.0))  # every matmul "takes" a second
    assert accel._time_matmul(8, torch.bfloat16) == 1.0
    assert len(reads) == 2  # the warm-up only: start and end
    reads.clear()
    monkeypatch.setattr(accel, "_clock", clock(1e-6))
    accel._time_matmul(8, torch.float32)
    assert len(reads) == 2 * (1 + accel.MATMUL_REPEATS)


def test_env_json_says_how_precision_was_decided(cpu, tmp_path):
    from types import SimpleNamespace

    from pipeline.run.folder import RunDir
    from pipeline.train.stage import write_run_files

    cpu("x86_64", AVX2_ONLY)
    precision = accel.resolve_precision("auto", "cpu")
    run = RunDir(tmp_path / "run")
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, mixed_precision=precision)
    write_run_files(run, acc, {})
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["mixed_precision"] == "no"
    assert env["precision_reason"] == "auto: cpu flags: no amx_bf16/avx512_bf16 (bf16 emulated)"
    # A precision the last resolution did not produce gets no reason rather than a wrong one.
    write_run_files(run, SimpleNamespace(**{**vars(acc), "mixed_precision": "bf16"}), {})
    assert "precision_reason" not in json.loads((tmp_path / "run" / "env.json").read_text())


def test_attention_kernel_choice():
    cpu = torch.device("cpu")
    assert accel.attention_kernel(cpu, "bf16") == "matmul"
    assert accel.attention_kernel(cpu, "no") == "sdpa"


def test_every_model_a_run_computes_with_gets_the_kernel():
    """stage.choose_attention_kernel: the trained model and a frozen teacher alike; a request wins over auto."""
    from types import SimpleNamespace

    from pipeline.config import ModelConfig
    from pipeline.model.gpt import GPT
    from pipeline.train import stage

    model = GPT(ModelConfig(n_layers=2, n_heads=2, d_model=16, max_seq_len=8, vocab_size=11))
    kernels = lambda: {block.attn.kernel for block in model.blocks}  # noqa: E731
    bf16 = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")
    stage.choose_attention_kernel(bf16, model)
    assert kernels() == {"matmul"}
    stage.choose_attention_kernel(bf16, model, "sdpa")
    assert kernels() == {"sdpa"}
    stage.choose_attention_kernel(SimpleNamespace(device=torch.device("cpu"), mixed_precision="no"), model)
    assert kernels() == {"sdpa"}
    stage.choose_attention_kernel(bf16, model, "auto")
    assert kernels() == {"matmul"}


def test_peak_memory_is_readable_and_resettable():
    cpu = torch.device("cpu")
    accel.reset_peak_memory(cpu)
    before = accel.peak_memory_gib(cpu)
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # touch 64 MiB
    assert accel.peak_memory_gib(cpu) >= before
    assert 0 < before < 64
    del block


def test_accelerates_launch_notice_is_explained_once_per_machine(monkeypatch, tmp_path):
    from accelerate.commands import config as accelerate_config

    monkeypatch.setenv("GPT_DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    monkeypatch.setattr(accel, "_launcher_args", lambda: None)
    assert accel.explain_launch_notice() is None  # plain python: no notice to explain
    monkeypatch.setattr(
        accel, "_launcher_args", lambda: ["accelerate", "launch", "--config_file", "x.yaml", "r.py"]
    )
    assert accel.explain_launch_notice() is None  # a launch config: Accelerate printed no notice
    monkeypatch.setattr(
        accel, "_launcher_args", lambda: ["/venv/bin/accelerate", "launch", "recipes/pretrain.py"]
    )
    note = accel.explain_launch_notice()
    assert note is not None and "accelerate config default" in note and "launch/cpu.yaml" in note
    assert accel.explain_launch_notice() is None  # once: the marker is in the cache
    assert (tmp_path / "cache" / accel.LAUNCH_NOTICE_NOTE).is_file()
