"""A 2-rank training + export worker for tests/test_export_distributed.py (not a test module itself).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_export_worker.py {ddp,fsdp2} OUT

Trains a tiny GPT for STEPS optimizer steps on fixed seeded batches with the pipeline's loss and
optimizer, then does what the training stage's checkpointer does: every rank gathers the state dict
(`checkpoint.gathered_state_dict`), rank 0 writes the export (`checkpoint.export_model`), all
ranks write a resumable state and load it back. Into OUT it writes `last/` (the export),
`states/step_*` (the resumable state) and `report.json` (what the pre-fix export path, rank 0's
`unwrap_model(model).state_dict()`, held and did; how far the resumed weights are from the saved
ones). The test process checks them against `reference_run`.

fsdp2: Accelerate refuses FSDP on a CPU through its public API, but its FSDP2 code path runs over
gloo. `force_fsdp2` flips the private state that decides it; `fsdp2_switch_problem` says when
the installed accelerate is not the one this switch was checked against (the test skips then).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.config import ModelConfig, OptimConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.model.gpt import GPT
from pipeline.run import checkpoint
from pipeline.train.losses import CrossEntropyHead
from pipeline.train.optim import build_optimizer

CHARS = "".join(chr(c) for c in range(32, 97))  # 65 characters
MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=32, max_seq_len=16, vocab_size=len(CHARS))
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=1.0)
GLOBAL_BATCH, SEQ_LEN, STEPS, SEED = 4, 16, 2, 0
FSDP2_CHECKED_WITH = ("1.15.", "1.16.")  # the accelerate releases the private-state switch was verified with


def batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ_LEN + 1) token windows, the same on every rank and in the reference."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, MODEL.vocab_size, (STEPS, GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)


def fresh_model() -> GPT:
    torch.manual_seed(SEED)  # the same initial weights on every rank
    return GPT(MODEL)


def step_loss(model: torch.nn.Module, window: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's summed CE scaled as the loop does (x world / global tokens): gradients averaged
    over ranks then equal the gradient of the global mean."""
    x, y = window[:, :-1], window[:, 1:]
    return model(x, head_fn=CrossEntropyHead(y)) * (world / (GLOBAL_BATCH * SEQ_LEN))


def reference_run() -> dict[str, torch.Tensor]:
    """The same steps in one plain process on the whole global batch: the weights 2 ranks must match."""
    model = fresh_model()
    optimizer = build_optimizer(model, OPTIM)
    for window in batches():
        step_loss(model, window, world=1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fsdp2_switch_problem() -> str | None:
    """Why the test-only FSDP2-on-CPU switch cannot be trusted with the installed accelerate, or None."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState

    if not accelerate.__version__.startswith(FSDP2_CHECKED_WITH):
        return (
            f"the FSDP2-on-CPU switch (private AcceleratorState/PartialState fields) was checked with "
            f"accelerate {', '.join(v + 'x' for v in FSDP2_CHECKED_WITH)}; installed {accelerate.__version__}: re-check "
            f"tests/dist_export_worker.py force_fsdp2 and update FSDP2_CHECKED_WITH"
        )
    if not isinstance(getattr(PartialState, "_shared_state", None), dict) or not hasattr(
        AcceleratorState, "is_fsdp2"
    ):
        return "accelerate no longer has PartialState._shared_state / AcceleratorState.is_fsdp2"
    return None


def force_fsdp2(accelerator, plugin) -> None:
    """Make a cpu=True Accelerator take its FSDP2 code path (prepare, clip, save/load_state, get_state_dict)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert accelerator.is_fsdp2 and accelerator.distributed_type == DistributedType.FSDP


def build_accelerator(mode: str):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    if mode == "ddp":
        return Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",  # as launch/gpu_fsdp.yaml: the old export path saw shards
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    force_fsdp2(accelerator, plugin)
    return accelerator


def old_path(accelerator, model, out: Path) -> dict:
    """What the pre-fix export saw and did: rank 0's unwrap_model(model).state_dict(), passed on.

    Under FSDP2 that call is local (no collective) and returns DTensors: full shapes, this rank's rows.
    """
    state = accelerator.unwrap_model(model).state_dict()
    seen = {
        key: {
            "type": type(value).__name__,
            "shape": list(value.shape),
            "local_shape": list((value.to_local() if hasattr(value, "to_local") else value).shape),
        }
        for key, value in state.items()
    }
    try:
        checkpoint.export_model(out / "old", state, MODEL, {}, VocabMap.identity(1), {})
        refused = ""
    except Exception as err:  # the message is what the test checks
        refused = f"{type(err).__name__}: {err}"
    return {"state": seen, "export_refused": refused}


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}  # under DDP they alias the live weights


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].cpu() - b[k].cpu()).abs().max().item() for k in b)


def train(accelerator, model, optimizer, windows: torch.Tensor) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    share = GLOBAL_BATCH // world
    for window in windows:
        accelerator.backward(step_loss(model, window[rank * share : (rank + 1) * share], world))
        accelerator.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(mode: str, out: Path) -> None:
    accelerator = build_accelerator(mode)
    assert accelerator.num_processes == 2, accelerator.num_processes
    model = fresh_model()
    model, optimizer = accelerator.prepare(model, build_optimizer(model, OPTIM))
    train(accelerator, model, optimizer, batches())

    # What the training stage's checkpointer does (pipeline/train/stage.py make_checkpointer).
    weights = checkpoint.gathered_state_dict(accelerator, model)  # every rank: a collective under FSDP
    report: dict = {"mode": mode}
    if accelerator.is_main_process:
        report["old_path"] = old_path(accelerator, model, out)
        info = {"kind": "teacher", "preset": "dist-export-test", "run": str(out), "step": STEPS}
        vocab = VocabMap.identity(len(CHARS))
        checkpoint.export_model(out / "last", weights, MODEL, Tokenizer.char(CHARS).spec, vocab, info)
    saved = snapshot(weights)
    state_dir = checkpoint.save_state(accelerator, out, {"step": STEPS}, keep=1)

    # Resume: one more step moves the weights, load_state must bring back the saved ones.
    train(accelerator, model, optimizer, batches()[:1])
    moved = snapshot(checkpoint.gathered_state_dict(accelerator, model))
    checkpoint.load_state(accelerator, state_dir, {"step": STEPS})
    resumed = checkpoint.gathered_state_dict(accelerator, model)
    if accelerator.is_main_process:
        report["moved_max_diff"] = max_diff(moved, saved)
        report["resumed_max_diff"] = max_diff(resumed, saved)
        (out / "report.json").write_text(json.dumps(report, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
