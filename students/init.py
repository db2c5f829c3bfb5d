"""init_from_teacher: a student's starting weights as pure functions of the teacher's state dict.

Every strategy returns a complete student state dict: each student key is either taken from a named
teacher key (the explicit key map, `copy_map`) with its shape checked, or computed from the
teacher's attention by a rule documented below, or left at the student's own random
initialisation. `load_student` loads the result strictly.

Layers: a student with fewer layers takes evenly spaced teacher layers, first and last kept
(`pipeline.distill.teacher.layer_map`).

The one-head student has one head of width D (= d_model), the teacher H heads of width d = D / H.
A teacher head h is placed into D-wide student attention through a slot map (`head_slots`): the
head's dimension i goes to student dimension slot(h, i), for its query, key and value rows and for
its column of the output projection.

* Learned, sinusoidal, ALiBi or no positions: slot(h, i) = h * d + i (heads side by side).
* RoPE rotates dimension pairs (j, j + D/2) at frequency base^(-2j/D); a teacher pair
  (i, i + d/2) turns at base^(-2i/d) = base^(-2iH/D). So slot(h, i) = i * H + h for i < d/2 (and
  D/2 + (i - d/2) * H + h for the second half): head 0 lands on exactly its own frequencies, head h
  on frequencies lower by a factor base^(-2h/D).

Strategies:

* random: the student's own initialisation (seeded), nothing from the teacher.
* copy: token/position embeddings, norms, FFN and LM head copied; attention re-initialised (random).
* best_head: per student layer, the head of its teacher layer whose ablation raises the teacher's val
  loss most (`importance`) is placed at slot(0, .), its query rows scaled by sqrt(D / d) so that its
  scores keep the teacher's 1/sqrt(d) scaling. The other dimensions: query and value rows random,
  key rows and output columns zero, so the student computes exactly "the teacher layer with only
  that head" (apart from ALiBi, whose one-head slope differs), yet no dimension is stuck at a zero
  gradient (q·k and o·v each have one random factor). The output bias is the teacher's.
* merged_heads: every head placed at slot(h, .), query rows scaled by 1/sqrt(H): the student's scores
  are the mean of the teacher heads' scores (exactly, except RoPE heads h > 0, see above), and the
  value/output maps keep every head: the summed per-head output maps sum_h W_o,h W_v,h are kept
  exactly (one head of width D holds all H of width d, so no low-rank fit is lost). The student is
  the teacher layer with every head reading through one shared, averaged attention pattern.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.distill.teacher import layer_map
from pipeline.model.gpt import GPT

STRATEGIES = ("random", "copy", "best_head", "merged_heads")
ATTENTION = ".attn."


def random_state(cfg: ModelConfig, seed: int) -> dict[str, Tensor]:
    """The student's own initialisation under `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.clone() for k, v in GPT(cfg).state_dict().items()}


def copy_map(teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> dict[str, str]:
    """Student key -> teacher key for every non-attention weight (blocks renumbered by layer_map)."""
    layers = layer_map(teacher_cfg.n_layers, student_cfg.n_layers)
    mapping = {}
    for key in _state_keys(student_cfg):
        if ATTENTION in key:
            continue
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            mapping[key] = f"blocks.{layers[int(index)]}.{rest}"
        else:
            mapping[key] = key
    return mapping


def head_slots(d_model: int, n_heads: int, head: int, rope: bool) -> Tensor:
    """Student dimension of each of a teacher head's d = d_model / n_heads dimensions (see the module doc)."""
    d = d_model // n_heads
    i = torch.arange(d)
    if not rope:
        return head * d + i
    half = d // 2
    first = (i % half) * n_heads + head
    return torch.where(i < half, first, d_model // 2 + first)


def init_from_teacher(
    strategy: str,
    teacher_state: dict[str, Tensor],
    teacher_cfg: ModelConfig,
    student_cfg: ModelConfig,
    importance: Tensor | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The student's state dict under `strategy` (see the module docstring); shapes checked."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown init strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    state = random_state(student_cfg, seed)
    if strategy == "random":
        return state
    check_compatible(teacher_cfg, student_cfg, strategy)
    for s_key, t_key in copy_map(teacher_cfg, student_cfg).items():
        state[s_key] = _checked(teacher_state, t_key, state[s_key], s_key)
    if strategy == "copy":
        return state
    layers = layer_map(teacher_cfg.n_layers, student_cfg.n_layers)
    for s_layer, t_layer in enumerate(layers):
        if strategy == "best_head":
            if importance is None:
                raise ValueError("init best_head needs the teacher's head importance scores")
            heads = [int(importance[t_layer].argmax())]
        else:
            heads = list(range(teacher_cfg.n_heads))
        attention = _place_heads(teacher_state, teacher_cfg, t_layer, heads, state, s_layer)
        state.update(attention)
    return state


def chosen_heads(importance: Tensor, teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> list[int]:
    """The teacher head behind each student layer under best_head."""
    layers = layer_map(teacher_cfg.n_layers, student_cfg.n_layers)
    return [int(importance[layer].argmax()) for layer in layers]


def _place_heads(
    teacher: dict[str, Tensor],
    cfg: ModelConfig,
    t_layer: int,
    heads: list[int],
    student: dict[str, Tensor],
    s_layer: int,
) -> dict[str, Tensor]:
    """One student layer's attention weights built from teacher heads `heads` of layer t_layer."""
    D, H = cfg.d_model, cfg.n_heads
    d = D // H
    rope = cfg.positions == "rope"
    t, s = f"blocks.{t_layer}.attn.", f"blocks.{s_layer}.attn."
    scale = math.sqrt(D / d) / len(heads)  # best_head: sqrt(H); merged_heads: 1/sqrt(H)
    out = {}
    for kind in ("weight", "bias"):
        if f"{t}qkv.{kind}" not in teacher:
            continue
        t_q, t_k, t_v = teacher[f"{t}qkv.{kind}"].split(D)  # (D, ...) each; head h's rows h*d:(h+1)*d
        q, k, v = (p.clone() for p in student[f"{s}qkv.{kind}"].split(D))
        k.zero_()
        proj = torch.zeros_like(student[f"{s}proj.weight"]) if kind == "weight" else None
        for slot_head, head in enumerate(heads):
            slots = head_slots(D, H, slot_head if len(heads) > 1 else 0, rope)
            rows = slice(head * d, (head + 1) * d)
            q[slots], k[slots], v[slots] = t_q[rows] * scale, t_k[rows], t_v[rows]
            if proj is not None:
                proj[:, slots] = teacher[f"{t}proj.weight"][:, rows]
        out[f"{s}qkv.{kind}"] = torch.cat((q, k, v))
        out[f"{s}proj.{kind}"] = proj if proj is not None else teacher[f"{t}proj.bias"].clone()
    return out


def check_compatible(teacher: ModelConfig, student: ModelConfig, strategy: str) -> None:
    """Raise ValueError (naming the flag) when `strategy` cannot copy this teacher into this student."""
    if strategy == "random":
        return
    for name in (
        "d_model",
        "ffn_mult",
        "vocab_size",
        "block",
        "positions",
        "tie_head",
        "bias",
        "max_seq_len",
    ):
        if getattr(teacher, name) != getattr(student, name):
            raise ValueError(
                f"init {strategy} copies teacher weights, so the student's {name} must be the teacher's "
                f"({getattr(teacher, name)}), not {getattr(student, name)}; keep --student.{name.replace('_', '-')} "
                f"at 0 or use --student.init random"
            )
    if student.n_layers > teacher.n_layers:
        raise ValueError(
            f"init {strategy}: the student has {student.n_layers} layers, the teacher only {teacher.n_layers}; "
            f"lower --student.n-layers or use --student.init random"
        )
    if strategy in ("best_head", "merged_heads") and student.n_heads != 1:
        raise ValueError(f"init {strategy} builds one head; use --student.n-heads 1")


def _checked(teacher: dict[str, Tensor], key: str, like: Tensor, student_key: str) -> Tensor:
    if key not in teacher:
        raise ValueError(f"the teacher's state has no {key} (for the student's {student_key})")
    value = teacher[key]
    if value.shape != like.shape:
        raise ValueError(
            f"shape mismatch: student {student_key} {tuple(like.shape)} vs teacher {key} {tuple(value.shape)}"
        )
    return value.detach().clone().to(like.dtype)


def _state_keys(cfg: ModelConfig) -> list[str]:
    with torch.device("meta"):
        return list(GPT(cfg).state_dict())


def load_student(model: GPT, state: dict[str, Tensor]) -> GPT:
    """Load an init_from_teacher result strictly: every key present, none extra, shapes equal."""
    model.load_state_dict(state, strict=True)
    return model
