"""Device, precision and process decisions (pipeline/accel.py), checked on the CPU."""

from __future__ import annotations

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
