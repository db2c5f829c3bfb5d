"""Distillation: divergences, the fused KD head, the frozen teacher, batches, the objective, the teacher cache."""
