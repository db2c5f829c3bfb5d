"""Training: batch arithmetic, fused losses, the optimizer and schedule, the loop, the noise scale, stage set-up."""
