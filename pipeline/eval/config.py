"""Configuration of the evaluate stage: which models, which prompts, which rollouts, how many bootstrap resamples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import non_negative, positive, require

RolloutMode = Literal["greedy", "sampled", "nucleus", "beam"]
ROLLOUT_MODES: tuple[RolloutMode, ...] = ("greedy", "sampled", "nucleus", "beam")


@dataclass
class EvaluateConfig:
    """Compare exported models: teacher-forced metrics, compounding errors, degeneration, attention."""

    models: tuple[str, ...] = ()
    """Exported models (or run folders: their best/) to compare, all of one tokenizer and vocabulary map."""
    names: tuple[str, ...] = ()
    """Display names, one per model (report, plots, metrics.json, tb/<name>); empty: each run folder's name without its timestamp, with -teacher/-student, -best/-last or -2 where needed to tell models apart."""
    teacher: str = ""
    """Judge for the teacher-as-judge metrics; empty: the first of --models when its export is a teacher and other models follow."""
    data: str = ""
    """Tokenized data folder whose val split is measured; empty: the one the first model was trained on."""
    out: str = ""
    """Run folder; empty: runs/evaluate/<first model's name>-<time>."""
    overwrite: bool = False
    """Replace an evaluation already in --out."""
    prompts: int = 200
    """M: prompts drawn from the val split (fixed seed)."""
    prompt_tokens: int = 64
    """P: tokens per prompt."""
    new_tokens: int = 64
    """N: tokens generated per prompt and compared with the true continuation."""
    seed: int = 0
    """Seed of the prompt positions, the sampled rollouts and the bootstrap."""
    rollouts: tuple[RolloutMode, ...] = ("greedy", "sampled")
    """Rollouts every model runs (presets default and quick: all four): greedy (always), sampled (--temperature/--top-k/--top-p), nucleus (top-p --nucleus), beam (--beam-width)."""
    sampled: bool = True
    """Keep the sampled rollout of --rollouts; --no-sampled drops it."""
    beam_width: int = 4
    """Beams of the beam-search rollout (1: the same as greedy)."""
    nucleus: float = 0.9
    """Top-p of the nucleus rollout (at --temperature, no top-k)."""
    temperature: float = 1.0
    """Temperature of the sampled rollouts."""
    top_k: int = 0
    """Top-k of the sampled rollouts; 0: off."""
    top_p: float = 1.0
    """Top-p of the sampled rollouts; 1: off."""
    gap_horizon: int = 8
    """Reference tokens scored after each prefix length j in the exposure-bias gap."""
    bootstrap: int = 1000
    """Bootstrap resamples over prompts for the 95% confidence intervals."""
    eval_tokens: int = 65536
    """Val tokens for the teacher-forced metrics (a fixed set of windows)."""
    seq_len: int = 0
    """Window of the teacher-forced metrics and loss by position; 0: the smallest max_seq_len among the models. Past a model's max_seq_len (length extrapolation): rope, alibi, sinusoidal or no positions only."""
    batch_size: int = 32
    """Sequences per forward pass."""
    attention_windows: int = 8
    """Val windows for the attention entropy and the average attention maps."""
    map_tokens: int = 32
    """Positions shown in the average attention maps."""
    collapse_threshold: float = 0.9
    """Flag a head as collapsed when its mean max attention probability exceeds this."""
    samples: int = 3
    """Prompts whose continuations are shown as text in the report."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision; auto: the Accelerate config's setting, else bf16 where the device runs it fast."""
    progress: bool = True
    """Show a progress bar naming each model's phase (teacher-forced, rollouts, judge, attention) with the time left (rank 0 only)."""
    preset: str = "default"
    """Preset: default or quick (see recipes/evaluate.py)."""
    config: str = ""
    """TOML or YAML file of settings, applied on top of the preset (command-line flags win)."""

    def __post_init__(self) -> None:
        positive(self, "evaluate", "prompts", "prompt_tokens", "new_tokens", "gap_horizon", "bootstrap")
        positive(self, "evaluate", "beam_width")
        require(
            "greedy" in self.rollouts and len(set(self.rollouts)) == len(self.rollouts),
            f"--rollouts {' '.join(self.rollouts) or '(empty)'} must name greedy (the headline metrics are greedy's) "
            f"and each mode once, from {' '.join(ROLLOUT_MODES)}",
        )
        require(0.0 < self.nucleus <= 1.0, f"--nucleus must be in (0, 1], got {self.nucleus}")
        positive(
            self, "evaluate", "eval_tokens", "batch_size", "attention_windows", "map_tokens", "temperature"
        )
        non_negative(self, "evaluate", "top_k", "seq_len", "samples")
        require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        require(
            0.0 < self.collapse_threshold <= 1.0,
            f"collapse_threshold must be in (0, 1], got {self.collapse_threshold}",
        )
        require(
            self.gap_horizon <= self.new_tokens,
            f"gap_horizon={self.gap_horizon} exceeds new_tokens={self.new_tokens}; lower --gap-horizon",
        )
        require(
            not self.names or len(self.names) == len(self.models),
            f"--names gives {len(self.names)} names for {len(self.models)} models; give one per model or none",
        )
